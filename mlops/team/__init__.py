"""The team server: ``mlops server`` (:mod:`mlops.team.launch`) and its auth app with the
promotion policy and the server-side audit trail (:mod:`mlops.team.app`)."""
