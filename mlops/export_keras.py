"""The Keras network of a ``keras_mlp`` pipeline as ONNX, joined to its converted preprocessing.

``tf2onnx.convert.from_keras`` does not take a Keras 3 model, so the fitted network
(``estimator.model_``) is traced as a ``tf.function`` with a fixed input signature and converted
with ``tf2onnx.convert.from_function``. The preprocessing graph (scikit-learn, via skl2onnx)
feeds its ``[N, n_features]`` output into the network's input, in one graph
(:func:`onnx.compose.merge_models`).
"""

from __future__ import annotations

from typing import Any

import onnx

NETWORK_INPUT = "features"
NETWORK_PREFIX = "net_"  # the network's node, edge and initializer names in the joined graph


def network_graph(estimator: Any, opset: int) -> onnx.ModelProto:
    """The fitted Keras network of ``estimator`` (``mlops.models.keras_mlp``) as an ONNX graph
    with one input :data:`NETWORK_INPUT` (float32 ``[N, n_features_in_]``) and one output."""
    import tensorflow as tf
    import tf2onnx

    network = estimator.model_
    signature = [
        tf.TensorSpec([None, int(estimator.n_features_in_)], tf.float32, name=NETWORK_INPUT)
    ]

    @tf.function(input_signature=signature)
    def forward(x: Any) -> Any:
        return network(x, training=False)

    model, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=opset)
    return model


def join(preprocess: onnx.ModelProto, network: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: ``preprocess``'s single output feeds ``network``'s single input.

    The network's names are prefixed (:data:`NETWORK_PREFIX`) so they cannot clash; the
    operator set of each domain is the higher of the two, as merging needs one per domain.
    """
    from onnx import compose

    opsets: dict[str, int] = {}
    for model in (preprocess, network):
        for entry in model.opset_import:
            domain = "" if entry.domain == "ai.onnx" else entry.domain
            opsets[domain] = max(opsets.get(domain, 0), entry.version)
    ir_version = max(preprocess.ir_version, network.ir_version)
    for model in (preprocess, network):
        del model.opset_import[:]
        model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
        model.ir_version = ir_version
    network = compose.add_prefix(network, prefix=NETWORK_PREFIX)
    (features,) = preprocess.graph.output
    (network_input,) = network.graph.input
    merged = compose.merge_models(preprocess, network, io_map=[(features.name, network_input.name)])
    # one entry per domain, as the quantizers require
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    return merged
