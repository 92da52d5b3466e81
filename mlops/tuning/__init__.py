"""Hyperparameter search with Optuna (see :mod:`.search`), its storage and its trial runs."""

from mlops.tuning.search import StudyResult, check_search_space, trial_writer_process, tune
from mlops.tuning.storage import open_storage

__all__ = ["StudyResult", "check_search_space", "open_storage", "trial_writer_process", "tune"]
