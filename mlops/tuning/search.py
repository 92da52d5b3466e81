"""Hyperparameter search with Optuna: one nested MLflow run per trial, pruning, resumable
and distributed studies, and the best configuration retrained, logged and registered.

The public entry point is :func:`tune`. Storage is chosen by URL (``tuning.storage``): in
memory by default, SQLite for one process, PostgreSQL for many workers. Workers started with
the same storage and study name share one study and together finish exactly ``n_trials``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import optuna
from optuna.trial import TrialState

from mlops import data as data_step
from mlops.config import Config
from mlops.data import DatasetSplit, encode_target
from mlops.errors import ConfigError
from mlops.lineage import log_split
from mlops.metrics import evaluate
from mlops.models import build_model, fit_model, get_family
from mlops.tracking import log_config, log_config_file, step_run
from mlops.tuning.storage import advisory_lock, open_storage
from mlops.tuning.trial_runs import TrialRuns

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# metric optimized per task, and its direction
OBJECTIVES: dict[str, tuple[str, Literal["minimize", "maximize"]]] = {
    "classification": ("accuracy", "maximize"),
    "regression": ("rmse", "minimize"),
}


class _SurplusTrial(Exception):
    """A trial started after the study already had its n_trials: it is not run."""


@dataclass(frozen=True)
class StudyResult:
    """What a tuning run found and produced."""

    study_name: str
    metric: str
    direction: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    n_complete: int
    n_pruned: int
    n_failed: int
    parent_run_id: str
    model_uri: str | None = None
    registered_version: str | None = None
    test_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # (trial number, state, value, seconds from the start of this call to the trial's end)
    history: tuple[tuple[int, str, float | None, float], ...] = ()


def tune(
    config: Config, *, progress: bool = True, split: DatasetSplit | None = None
) -> StudyResult:
    """Search ``tuning.search_space`` for the configured family; see the module docstring.

    Example:
        >>> result = tune(load_config(overrides=["model.family=hist_gb", "tuning.n_trials=30"]))
        >>> result.best_params, result.registered_version
    """
    tcfg = config.tuning
    family = config.model.family
    get_family(family)
    check_search_space(config)
    storage = open_storage(config)
    runs = TrialRuns(use_process=trial_writer_process(config)) if tcfg.log_trials else None
    try:
        return _search(config, storage, split or data_step.prepare(config), runs, progress)
    finally:
        # the last trials' runs were finished in the background while the best was retrained
        if runs is not None:
            runs.close()


def _search(
    config: Config, storage: Any, split: DatasetSplit, runs: TrialRuns | None, progress: bool
) -> StudyResult:
    tcfg, family = config.tuning, config.model.family
    metric, direction = OBJECTIVES[split.task]
    study_name = tcfg.study_name or f"{config.experiment}-{family}"
    # A stored study is resumed or shared: a worker seeded like the others (or like the run it
    # resumes) would draw the same configurations again, so each process gets its own seed.
    seed = (
        config.seed
        if storage is None
        else (config.seed * 1_000_003 + os.getpid() + time.time_ns()) % 2**32
    )
    # constant liar: workers sharing a study do not all pick the point the others are running
    sampler: optuna.samplers.BaseSampler
    if tcfg.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=storage is not None)
    elif tcfg.sampler == "grid":
        # every point once, in a seeded random order; workers sharing a study skip the points
        # others ran, and the study stops when the grid is done (even before n_trials)
        sampler = optuna.samplers.GridSampler(grid_points(tcfg.search_space), seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    pruner = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        "hyperband": optuna.pruners.HyperbandPruner(),
        "none": optuna.pruners.NopPruner(),
    }[tcfg.pruner]
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction=direction,
            load_if_exists=True,
        )
    except ValueError as exc:  # e.g. an existing study with the other direction
        raise ConfigError(
            f"tuning.study_name '{study_name}': {exc}; pick another study name"
        ) from None

    started = time.time()
    with step_run(config, run_name=f"tune-{family}") as parent:
        parent_id = parent.info.run_id
        if runs is not None:
            # first: the writer ends the parent run too should this process be killed from now on
            runs.start(parent.info.experiment_id, parent_id, study_name)
        # the model's params are logged once the best is known: those of the model this run holds
        log_config(config, tuning=True, model_params=False)
        mlflow.set_tags(
            {"mlops.study_name": study_name, "mlops.tuning_metric": f"validation_{metric}"}
        )
        log_split(split)
        objective = _Objective(config, split, metric, runs)
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        bar = _progress(tcfg.n_trials, done, enabled=progress)
        try:
            study.optimize(
                objective,
                n_trials=None,
                timeout=tcfg.timeout,
                catch=(_SurplusTrial,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(tcfg.n_trials, states=FINISHED),
                    bar.callback,
                ],
                gc_after_trial=False,
            )
        finally:
            bar.close()
        result = _summarize(config, study, split, metric, direction, parent_id, storage)
    history = tuple(
        (t.number, t.state.name, t.value, (t.datetime_complete.timestamp() - started))
        for t in study.get_trials(deepcopy=False)
        if t.datetime_complete is not None and t.datetime_complete.timestamp() >= started
    )
    return dataclasses.replace(result, history=history)


def trial_writer_process(config: Config) -> bool:
    """Whether a child process writes the trial runs (``tuning.trial_writer``; see its comment)."""
    choice = config.tuning.trial_writer
    if choice != "auto":
        return choice == "process"
    storage = config.tuning.storage or ""
    return storage == "" or storage.startswith("sqlite")


def check_search_space(config: Config) -> None:
    """Every parameter of the space must be one the family accepts."""
    space = config.tuning.search_space
    family = config.model.family
    if not space:
        raise ConfigError(
            f"tuning.search_space is empty for {family}; declare one in "
            f"conf/search_spaces/{family}.yaml"
        )
    estimators = get_family(family).estimators.values()
    valid = set().union(*(set(factory().get_params(deep=False)) for factory in estimators))
    unknown = sorted(set(space) - valid)
    if unknown:
        raise ConfigError(
            f"tuning.search_space: {unknown} not parameters of {family}; valid: "
            f"{', '.join(sorted(valid))}"
        )
    if config.tuning.sampler == "grid":
        grid_points(space)


class _Objective:
    """One trial: a nested MLflow run, a fit with pruning, the validation metric."""

    def __init__(
        self, config: Config, split: DatasetSplit, metric: str, runs: TrialRuns | None
    ) -> None:
        self.config, self.split, self.metric, self.runs = config, split, metric, runs
        self.steps: list[tuple[str, float, int, int]] = []
        self.space = config.tuning.search_space
        self.n_trials = config.tuning.n_trials

    def __call__(self, trial: optuna.Trial) -> float:
        ahead = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=_COUNTED)
            if t.number < trial.number
        ]
        if len(ahead) >= self.n_trials:  # other workers already hold every trial asked for
            trial.set_user_attr("mlops.surplus", True)
            trial.study.stop()
            raise _SurplusTrial(
                f"trial {trial.number} not needed: the study has its {self.n_trials} trials"
            )
        params = {name: _suggest(trial, name, spec) for name, spec in self.space.items()}
        self.steps = []
        if self.runs is None:
            return self._fit(trial, {**self.config.model.params, **params})
        # the trial's run is opened, filled and closed in the background (see mlops.trial_runs):
        # the trial's own work, not its bookkeeping, sets the pace of a search
        self.runs.open(trial, int(time.time() * 1000))
        state, status, value = "FAIL", "FAILED", None
        try:
            value = self._fit(trial, {**self.config.model.params, **params})
            state, status = "COMPLETE", "FINISHED"
            return value
        except optuna.TrialPruned:
            state, status = (
                "PRUNED",
                "FINISHED",
            )  # stopped on purpose, not failed: the state tag says PRUNED
            raise
        finally:
            now = int(time.time() * 1000)
            metrics = [
                *self.steps,
                *([(f"validation_{self.metric}", value, now, 0)] if value is not None else []),
            ]
            self.runs.finish(
                trial.number, metrics, {k: str(v) for k, v in params.items()}, state, status, now
            )

    def _log_step(self, key: str, value: float, step: int) -> None:
        self.steps.append((key, float(value), int(time.time() * 1000), step))

    def _fit(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        split, config = self.split, self.config
        pipeline = build_model(
            config.model.family,
            split.task,
            params,
            numeric_columns=split.numeric_columns,
            categorical_columns=split.categorical_columns,
            seed=config.seed,
            features=config.data.features,
        )
        X_train, y_train = split.xy("train")
        if "on_epoch_end" in inspect.signature(pipeline.steps[-1][1].fit).parameters:
            # per-epoch validation metric: the pruner sees each epoch
            X_val, y_val = split.xy("validation")

            def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
                value = (
                    logs.get("val_accuracy")
                    if split.task == "classification"
                    else np.sqrt(logs.get("val_loss", np.nan))
                )
                if value is None or not np.isfinite(value):
                    return
                self._log_step(f"val_{self.metric}", float(value), epoch)
                trial.report(float(value), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            fit_model(
                pipeline,
                X_train,
                encode_target(split, y_train),
                X_val,
                encode_target(split, y_val),
                on_epoch_end=on_epoch_end,
                family=config.model.family,
            )
            return evaluate(pipeline, split, X_val, y_val)[self.metric]
        # scikit-learn families: k-fold scores on the training part, one step per fold
        from sklearn.base import clone
        from sklearn.model_selection import KFold, StratifiedKFold

        folds = (StratifiedKFold if split.task == "classification" else KFold)(
            n_splits=config.tuning.cv_folds, shuffle=True, random_state=config.seed
        )
        y_codes = encode_target(split, y_train)
        scores = []
        for step, (fit_idx, val_idx) in enumerate(folds.split(X_train, y_codes)):
            model = clone(pipeline)
            fit_model(model, X_train.iloc[fit_idx], y_codes[fit_idx], family=config.model.family)
            score = evaluate(model, split, X_train.iloc[val_idx], y_train.iloc[val_idx])[
                self.metric
            ]
            scores.append(score)
            mean = float(np.mean(scores))
            self._log_step(f"cv_{self.metric}", mean, step)
            trial.report(mean, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {step}")
        return float(np.mean(scores))


MAX_GRID = 100_000  # points of a grid search; a larger one is refused before any trial


def grid_points(space: dict[str, Any]) -> dict[str, list[Any]]:
    """The values a grid search tries per parameter (``tuning.sampler: grid``): a categorical
    parameter's choices, every step of an int or stepped float, and ``grid`` points (evenly or
    geometrically spaced) of a float without a step."""
    points: dict[str, list[Any]] = {}
    for name, spec in space.items():
        if spec.type == "categorical":
            values: list[Any] = list(spec.choices)
        elif spec.type == "int":
            values = list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))
        elif spec.step is not None:
            count = int(np.floor((spec.high - spec.low) / spec.step + 1e-9)) + 1
            values = [float(spec.low + i * spec.step) for i in range(count)]
        elif spec.log:
            values = [float(v) for v in np.geomspace(spec.low, spec.high, spec.grid)]
        else:
            values = [float(v) for v in np.linspace(spec.low, spec.high, spec.grid)]
        points[name] = values
    total = int(np.prod([len(v) for v in points.values()], dtype=float))
    if total > MAX_GRID:
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in points.items())
        raise ConfigError(
            f"tuning.sampler=grid: the search space has {total:,} points ({sizes}), more than "
            f"{MAX_GRID:,}; give ints a larger step, floats fewer grid points (grid: N), or "
            "use sampler tpe"
        )
    return points


def _suggest(trial: optuna.Trial, name: str, spec: Any) -> Any:
    if spec.type == "categorical":
        return trial.suggest_categorical(name, spec.choices)
    if spec.type == "int":
        return trial.suggest_int(
            name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log
        )
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


def _summarize(
    config: Config,
    study: optuna.Study,
    split: DatasetSplit,
    metric: str,
    direction: str,
    parent_id: str,
    storage: Any,
) -> StudyResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {
        s: sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    mlflow.log_metrics(
        {
            "trials_complete": counts[TrialState.COMPLETE],
            "trials_pruned": counts[TrialState.PRUNED],
            "trials_failed": counts[TrialState.FAIL],
        }
    )
    _log_study_artifacts(study)
    result = StudyResult(
        study.study_name,
        metric,
        direction,
        None,
        {},
        None,
        counts[TrialState.COMPLETE],
        counts[TrialState.PRUNED],
        counts[TrialState.FAIL],
        parent_id,
    )
    if not complete:
        logger.warning("no trial completed; nothing to retrain")
        return result
    best = study.best_trial
    assert best.value is not None  # a complete trial of a single-objective study has a value
    mlflow.log_metric(f"best_trial_{metric}", best.value)
    mlflow.set_tag("mlops.best_trial", best.number)
    result = dataclasses.replace(
        result, best_value=best.value, best_params=dict(best.params), best_trial=best.number
    )
    with _claim(study, storage) as mine:
        if not mine:
            logger.info(
                "another worker retrains and registers the best model of %s", study.study_name
            )
            return result
        return _retrain_best(config, study, split, best, result)


@contextmanager
def _claim(study: optuna.Study, storage: Any) -> Iterator[bool]:
    """True for exactly one worker: the one that finds the study finished and unclaimed."""
    lock = advisory_lock(storage, study.study_name) if storage is not None else nullcontext()
    with lock:
        # trials still running elsewhere: their worker finishes the study and claims it
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        if study.user_attrs.get("mlops.best_registered_by") or running:
            yield False
            return
        study.set_user_attr(
            "mlops.best_registered_by", f"{os.uname().nodename}:{os.getpid()}:{time.time():.0f}"
        )
    yield True


def _retrain_best(
    config: Config, study: optuna.Study, split: DatasetSplit, best: Any, result: StudyResult
) -> StudyResult:
    from mlops.registry import register
    from mlops.serving import log_model
    from mlops.training import fit_and_evaluate

    best_config = config.model_copy(
        update={
            "model": config.model.model_copy(
                update={"params": {**config.model.params, **best.params}}
            )
        }
    )
    mlflow.log_params({f"model.params.{k}": v for k, v in sorted(best_config.model.params.items())})
    log_config_file(best_config)  # the best configuration's, in place of the search's
    # retrained as `mlops train` trains: on the training part alone, so its validation metrics,
    # its early stopping and its reference profile are measured on rows it never saw
    pipeline, metrics = fit_and_evaluate(best_config, split, log=True)
    test_metrics = {k: v for k, v in metrics.items() if k.startswith("test_")}
    info = log_model(pipeline, split, best_config)
    version = None
    if config.tuning.register_best:
        mv = register(info.model_uri, config.registry.model_name)
        client = mlflow.MlflowClient()
        client.set_model_version_tag(mv.name, mv.version, "mlops.study_name", study.study_name)
        client.set_model_version_tag(mv.name, mv.version, "mlops.best_trial", str(best.number))
        version = str(mv.version)
    return dataclasses.replace(
        result, model_uri=info.model_uri, registered_version=version, test_metrics=test_metrics
    )


def _log_study_artifacts(study: optuna.Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from optuna.visualization import matplotlib as ovm

    with tempfile.TemporaryDirectory() as tmp:
        frame = study.trials_dataframe()
        frame.to_csv(Path(tmp) / "trials.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "trials.csv"), artifact_path="study")

    for name, plot in (
        ("optimization_history", ovm.plot_optimization_history),
        ("param_importances", ovm.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                ax = plot(study)
            fig = ax.figure
            assert isinstance(fig, Figure)  # optuna draws each plot on a figure of its own
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            mlflow.log_figure(fig, f"study/{name}.png")
            plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            logger.info("no %s plot: %s", name, exc)


class _progress:
    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=min(initial, total),
            desc="trials",
            unit="trial",
            disable=not enabled,
        )

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in FINISHED:
            best = (
                study.best_value
                if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
                else None
            )
            self.bar.set_postfix(best=f"{best:.4f}" if best is not None else "-", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
