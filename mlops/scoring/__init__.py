"""Batch scoring of tables with a registered version (`mlops score`).

``score`` downloads and verifies the version, then streams CSV or Parquet (a file, a folder, a
glob; local or ``s3://``) through it with the ``pandas`` engine (bounded memory) or in Spark's
Python workers with the ``spark`` engine; rows the model's input contract refuses
are set aside with their reason. Each job is one MLflow run.
"""

from mlops.scoring.core import ScoringFailed, ScoringResult, resolve_version, score
from mlops.scoring.sources import ScoringInputError

__all__ = ["ScoringFailed", "ScoringInputError", "ScoringResult", "resolve_version", "score"]
