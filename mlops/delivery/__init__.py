"""Delivery: a promoted version as a serving image (`mlops package`), as Kubernetes manifests
(`mlops k8s`), and the contract both keep (:mod:`mlops.delivery.contract`)."""
