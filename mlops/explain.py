"""Explanations: global (permutation importance, SHAP summary) on every training run, and
per-row contributions on request (``mlops explain``, serving's ``{"params": {"explain": k}}``).

Contributions are SHAP values computed with the ``shap`` package on the preprocessed matrix
and summed back to the ORIGINAL features (a one-hot block to its column, a declared feature
transform's outputs to its column). For each row they explain one model output, and
``expected_value + sum(contributions) == value`` holds for that output:

============== ============================== =========================================
family         explainer                      output explained (classification)
============== ============================== =========================================
logreg, ridge  ``shap.LinearExplainer``       log-odds of ``classes[1]`` (binary); the
               (background: training mean)    predicted class's logit (more classes)
random_forest  ``shap.TreeExplainer``         probability of the predicted class
               (path-dependent)
hist_gb        ``shap.TreeExplainer``         raw score (log-odds) of ``classes[1]``
               (path-dependent)               (binary); the predicted class's raw score
keras_mlp      ``shap.KernelExplainer``       probability of the predicted class
               (k-means background summary)
============== ============================== =========================================

Regression models explain the prediction itself. Linear and tree contributions add up
exactly (to rounding); kernel ones add up by construction but are a sampled estimate.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlops.config import Config
from mlops.data import DatasetSplit, encode_target

logger = logging.getLogger(__name__)

LINEAR, TREE, KERNEL = ("logreg", "ridge"), ("random_forest", "hist_gb"), ("keras_mlp",)
METADATA_KEY = "explain"  # in a logged model's metadata.json: what the explainer needs
FEATURE_ENTRY = "feature_"  # mlops.features names each declared column's entry feature_<column>
KMEANS_CENTERS = 10  # a kernel explainer's background summary (model calls grow with it)
KERNEL_SEED = 0  # the kernel explainer's sampling: the same row, the same explanation


@dataclass(frozen=True)
class RowContributions:
    """Per-row contributions to one model output each, per original feature.

    ``expected[i] + values[i].sum() == output[i]``; ``explains[i]`` names the output.
    """

    features: list[str]
    values: np.ndarray  # (rows, features)
    expected: np.ndarray  # (rows,)
    output: np.ndarray  # (rows,)
    explains: list[str]

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` largest contributions of each row by magnitude, largest first."""
        order = np.argsort(-np.abs(self.values), axis=1, kind="stable")[:, :k]
        return [
            [(self.features[j], float(self.values[i, j])) for j in row]
            for i, row in enumerate(order)
        ]

    def as_records(self, k: int) -> list[dict[str, Any]]:
        """Each row's answer: what is explained, its value and expected value, the top ``k``
        contributions and the sum of the others (so the parts add up to ``value``)."""
        out = []
        for i, top in enumerate(self.top(k)):
            shown = sum(c for _, c in top)
            out.append(
                {
                    "explains": self.explains[i],
                    "value": float(self.output[i]),
                    "expected_value": float(self.expected[i]),
                    "contributions": [{"feature": f, "contribution": c} for f, c in top],
                    "others": float(self.values[i].sum() - shown),
                }
            )
        return out


def feature_owners(preprocess: Any, features: list[str]) -> np.ndarray:
    """For each column of ``preprocess``'s output (a fitted ColumnTransformer), the index in
    ``features`` of the original column it comes from.

    ``numeric``: one output per column; ``categorical``: its one-hot outputs, per column by
    ``categories_``; ``feature_<column>`` (a declared feature transform, see
    :mod:`mlops.features`): every output to that column.
    """
    index = {c: i for i, c in enumerate(features)}
    width = max((s.stop for s in preprocess.output_indices_.values()), default=0)
    owners = np.full(width, -1, dtype=int)
    for name, transformer, columns in preprocess.transformers_:
        part = preprocess.output_indices_.get(name)
        if part is None or part.stop == part.start or name == "remainder":
            continue
        cols = [columns] if isinstance(columns, str) else list(columns)
        size = part.stop - part.start
        declared = name[len(FEATURE_ENTRY) :] if name.startswith(FEATURE_ENTRY) else None
        if declared in index:  # a declared feature transform: all its outputs are its column's
            owners[part] = index[str(declared)]
        elif size == len(cols):
            owners[part] = [index[c] for c in cols]
        elif len(cols) == 1:
            owners[part] = index[cols[0]]
        else:
            lengths = _onehot_lengths(transformer)
            if lengths is None or sum(lengths) != size or len(lengths) != len(cols):
                raise ValueError(
                    f"cannot map the {size} outputs of transformer {name!r} back to its columns "
                    f"{cols}; expected one output per column, a one-hot encoding, or one column"
                )
            owners[part] = np.repeat([index[c] for c in cols], lengths)
    if (owners < 0).any():
        raise ValueError("some transformed columns map to no original feature")
    return owners


def _onehot_lengths(transformer: Any) -> list[int] | None:
    steps = getattr(transformer, "steps", None)
    encoder = steps[-1][1] if steps else transformer
    categories = getattr(encoder, "categories_", None)
    if categories is None or getattr(encoder, "drop_idx_", None) is not None:
        return None
    return [len(c) for c in categories]


class Explainer:
    """SHAP contributions of a fitted ``Pipeline(preprocess, estimator)``, built once and
    used for many calls (thread-safe; ``shap`` is imported at construction)."""

    def __init__(
        self,
        pipeline: Any,
        *,
        family: str,
        task: str,
        classes: list[str] | None,
        features: list[str],
        background: np.ndarray | None,
        kernel_samples: int = 200,
    ) -> None:
        shap = _shap()

        self.preprocess, self.estimator = pipeline.steps[0][1], pipeline.steps[-1][1]
        self.family, self.task, self.features = family, task, list(features)
        self.classes = list(classes) if classes else None
        self.kernel_samples = int(kernel_samples)
        self.owners = feature_owners(self.preprocess, self.features)
        self._lock = threading.Lock()
        if family in TREE:
            self.kind = "tree"
            self._explainer = shap.TreeExplainer(
                self.estimator, model_output="raw", feature_perturbation="tree_path_dependent"
            )
        elif family in LINEAR or family in KERNEL:
            if background is None or not len(background):
                raise ValueError(
                    f"a {family} explainer needs a background sample of the transformed "
                    "training data; re-log the model with this version of mlops"
                )
            background = np.asarray(background, dtype=float)
            if family in LINEAR:
                self.kind = "linear"
                masker = shap.maskers.Independent(background.mean(axis=0, keepdims=True))
                self._explainer = shap.LinearExplainer(self.estimator, masker)
            else:
                self.kind = "kernel"
                f = (
                    self.estimator.predict_proba
                    if task == "classification"
                    else (lambda X: np.asarray(self.estimator.predict(X)).reshape(-1))
                )
                self._explainer = shap.KernelExplainer(f, background, silent=True)
        else:
            raise ValueError(f"no explainer for model family {family!r}")

    @classmethod
    def for_model(cls, pipeline: Any, meta: dict[str, Any]) -> Explainer:
        """The explainer of a logged model from its ``metadata.json`` (nothing else read)."""
        saved = meta.get(METADATA_KEY) or {}
        background = saved.get("background")
        return cls(
            pipeline,
            family=str(meta.get("family") or saved.get("family")),
            task=meta["task"],
            classes=meta.get("classes"),
            features=list(meta["numeric_columns"]) + list(meta["categorical_columns"]),
            background=np.asarray(background, dtype=float) if background else None,
            kernel_samples=int(saved.get("kernel_samples", 200)),
        )

    def explain(self, X: pd.DataFrame) -> RowContributions:
        """Contributions for the rows of ``X`` (original columns)."""
        Xt = self.preprocess.transform(X)
        if hasattr(Xt, "toarray"):
            Xt = Xt.toarray()
        return self.explain_transformed(np.asarray(Xt, dtype=float))

    def explain_transformed(self, Xt: np.ndarray) -> RowContributions:
        """Contributions for rows already transformed by the pipeline's preprocessing."""
        with self._lock:
            if self.kind == "kernel":
                # shap samples coalitions from NumPy's global generator: seeded here (and put
                # back after), so that a row is explained the same way every time it is asked
                state = np.random.get_state()
                np.random.seed(KERNEL_SEED)
                try:
                    raw = self._explainer.shap_values(Xt, nsamples=self.kernel_samples, silent=True)
                finally:
                    np.random.set_state(state)
            elif self.kind == "tree":
                raw = self._explainer.shap_values(Xt, check_additivity=False)
            else:
                raw = self._explainer.shap_values(Xt)
            base = np.atleast_1d(np.asarray(self._explainer.expected_value, dtype=float))
        values = _stack(raw, len(Xt))  # (rows, transformed, outputs)
        if base.size != values.shape[2]:
            base = np.resize(base, values.shape[2])
        outputs = base[None, :] + values.sum(axis=1)  # (rows, outputs)
        chosen = (
            np.argmax(outputs, axis=1) if outputs.shape[1] > 1 else np.zeros(len(Xt), dtype=int)
        )
        rows = np.arange(len(Xt))
        picked = values[rows, :, chosen]  # (rows, transformed)
        original = np.zeros((len(Xt), len(self.features)))
        np.add.at(original.T, self.owners, picked.T)
        return RowContributions(
            features=self.features,
            values=original,
            expected=base[chosen],
            output=outputs[rows, chosen],
            explains=[self._describe(int(c), outputs.shape[1]) for c in chosen],
        )

    def _describe(self, output: int, n_outputs: int) -> str:
        if self.task != "classification" or not self.classes:
            return "prediction"
        cls = self.classes[1] if n_outputs == 1 else self.classes[output]
        if self.kind == "linear":
            return f"log-odds of {cls!r}" if n_outputs == 1 else f"logit of {cls!r}"
        if self.family == "hist_gb":
            return f"raw score (log-odds) of {cls!r}" if n_outputs == 1 else f"raw score of {cls!r}"
        return f"probability of {cls!r}"


def _shap() -> Any:
    """The ``shap`` module (imported on first use: it is slow to import)."""
    with warnings.catch_warnings():  # its colour maps use matplotlib calls deprecated there
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        import shap
    return shap


def _stack(raw: Any, rows: int) -> np.ndarray:
    """SHAP values in any of shap's shapes as ``(rows, columns, outputs)``."""
    if isinstance(raw, list):
        return np.stack([np.asarray(r, dtype=float) for r in raw], axis=-1)
    arr = np.asarray(raw, dtype=float)
    if arr.ndim == 2:
        return arr[:, :, None]
    return arr.reshape(rows, arr.shape[-2], arr.shape[-1])


def background_for(
    pipeline: Any, X_train: pd.DataFrame, family: str, *, rows: int, seed: int
) -> np.ndarray:
    """The background an explainer of ``family`` uses, as transformed rows: for a linear
    model the mean of ``rows`` sampled training rows (all it needs), for a kernel explainer
    at most :data:`KMEANS_CENTERS` k-means centres of them, for trees nothing (path-dependent
    TreeSHAP uses the trees' own training cover). Aggregates only: no training row is kept."""
    if family in TREE:
        return np.zeros((0, 0))
    sample = X_train.sample(n=min(rows, len(X_train)), random_state=seed)
    Xt = pipeline.steps[0][1].transform(sample)
    Xt = np.asarray(Xt.toarray() if hasattr(Xt, "toarray") else Xt, dtype=float)
    if family in LINEAR:
        return Xt.mean(axis=0, keepdims=True)
    from sklearn.cluster import KMeans

    k = min(KMEANS_CENTERS, len(Xt))
    return np.asarray(KMeans(n_clusters=k, n_init=3, random_state=seed).fit(Xt).cluster_centers_)


def explain_metadata(pipeline: Any, split: DatasetSplit, config: Config) -> dict[str, Any]:
    """What a logged model keeps so it can explain rows without any other file: the
    background (:func:`background_for`) and the kernel explainer's sample count."""
    background = background_for(
        pipeline,
        split.train[list(split.feature_columns)],
        config.model.family,
        rows=config.explain.background_rows,
        seed=config.seed,
    )
    return {
        "family": config.model.family,
        "background": background.tolist(),
        "kernel_samples": config.explain.kernel_samples,
    }


def metric_key(feature: str, taken: set[str]) -> str:
    """``importance_<feature>`` as an MLflow metric key (other characters become ``_``)."""
    base = "importance_" + re.sub(r"[^0-9A-Za-z_.\-]", "_", feature)
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


PERMUTED_CELLS = 4_000_000  # permuted copies scored per model call (rows x columns, at most)


def permutation_importances(
    pipeline: Any,
    X: pd.DataFrame,
    y: np.ndarray,
    features: list[str],
    *,
    task: str,
    repeats: int,
    seed: int,
) -> np.ndarray:
    """Permutation importance of each original feature, ``(n_features, repeats)``: the drop
    in accuracy (classification) or R² (regression) when that feature's values are shuffled
    among the rows, as :func:`sklearn.inspection.permutation_importance` measures it.

    The preprocessing works row by row, so shuffling a column before it equals shuffling the
    rows of that column's outputs after it (:func:`feature_owners`): the rows are transformed
    once, and the shuffled copies are stacked and scored in few model calls instead of one per
    feature and repeat (a 200-tree forest: ~35 ms a call, mostly per-call overhead).
    """
    from sklearn.metrics import r2_score

    preprocess, estimator = pipeline.steps[0][1], pipeline.steps[-1][1]
    Xt = preprocess.transform(X)
    Xt = np.asarray(Xt.toarray() if hasattr(Xt, "toarray") else Xt, dtype=float)
    owners = feature_owners(preprocess, features)
    n = len(Xt)

    def score(pred: np.ndarray) -> float:
        if task == "classification":
            return float(np.mean(np.asarray(pred).astype(int) == y))
        return float(r2_score(y, np.asarray(pred, dtype=float).reshape(-1)))

    baseline = score(estimator.predict(Xt))
    rng = np.random.RandomState(seed)
    jobs = [(j, r) for j in range(len(features)) for r in range(repeats)]
    per_call = max(1, PERMUTED_CELLS // max(Xt.size, 1))
    out = np.zeros((len(features), repeats))
    for start in range(0, len(jobs), per_call):
        chunk = jobs[start : start + per_call]
        copies = []
        for j, _ in chunk:
            columns = owners == j
            copy = Xt.copy()
            copy[:, columns] = Xt[rng.permutation(n)][:, columns]
            copies.append(copy)
        pred = np.asarray(estimator.predict(np.vstack(copies)))
        for k, (j, r) in enumerate(chunk):
            out[j, r] = baseline - score(pred[k * n : (k + 1) * n])
    return out


def log_global_explanations(pipeline: Any, split: DatasetSplit, config: Config) -> dict[str, float]:
    """Log permutation importance and SHAP summaries on the active run; returns logged metrics.

    Permutation importance: the whole pipeline on the validation split, scored by accuracy
    (classification) or R² (regression), as metrics ``importance_<feature>`` and
    ``plots/permutation_importance.png``. SHAP: ``explain.sample_rows`` validation rows,
    their mean |contribution| per original feature in ``explain/shap_importance.csv`` and
    ``.json``, and ``plots/shap_summary.png``.
    """
    import mlflow

    ecfg = config.explain
    features = list(split.feature_columns)
    X_val, y_val = split.xy("validation")
    importances = permutation_importances(
        pipeline,
        X_val,
        encode_target(split, y_val),
        features,
        task=split.task,
        repeats=ecfg.permutation_repeats,
        seed=config.seed,
    )
    taken: set[str] = set()
    metrics = {
        metric_key(f, taken): float(m)
        for f, m in zip(features, importances.mean(axis=1), strict=True)
    }
    mlflow.log_metrics(metrics)
    _plot_permutation(features, importances, split.task)

    explainer = Explainer(
        pipeline,
        family=config.model.family,
        task=split.task,
        classes=list(split.classes) if split.classes else None,
        features=features,
        background=background_for(
            pipeline,
            split.train[features],
            config.model.family,
            rows=ecfg.background_rows,
            seed=config.seed,
        ),
        kernel_samples=ecfg.kernel_samples,
    )
    sample = X_val.sample(n=min(ecfg.sample_rows, len(X_val)), random_state=config.seed)
    contributions = explainer.explain(sample)
    mean_abs = np.abs(contributions.values).mean(axis=0)
    table = pd.DataFrame({"feature": features, "mean_abs_contribution": mean_abs})
    table = table.sort_values("mean_abs_contribution", ascending=False, kind="stable")
    mlflow.log_text(table.to_csv(index=False), "explain/shap_importance.csv")
    mlflow.log_dict(
        {
            "explains": sorted(set(contributions.explains)),
            "rows": len(sample),
            "importance": dict(
                zip(table["feature"], map(float, table["mean_abs_contribution"]), strict=True)
            ),
        },
        "explain/shap_importance.json",
    )
    _plot_shap(contributions, sample, split)
    return metrics


def _plot_permutation(features: list[str], importances: np.ndarray, task: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    order = np.argsort(importances.mean(axis=1))[-20:]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(order) + 1.5))
    ax.boxplot(importances[order].T, vert=False, tick_labels=[features[i] for i in order])
    ax.axvline(0, color="grey", lw=1, ls="--")
    score = "accuracy" if task == "classification" else "R²"
    ax.set(
        xlabel=f"drop in {score} when the feature is shuffled",
        title="Permutation importance (validation)",
    )
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/permutation_importance.png")
    plt.close(fig)


def _plot_shap(contributions: RowContributions, sample: pd.DataFrame, split: DatasetSplit) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    shap = _shap()

    # colour by the feature's value where it is a number; categories stay grey
    colour = np.full(contributions.values.shape, np.nan)
    for j, col in enumerate(contributions.features):
        if col in split.numeric_columns:
            colour[:, j] = pd.to_numeric(sample[col], errors="coerce").to_numpy(dtype=float)
    with warnings.catch_warnings():  # an all-grey (categorical) column's colour scale; shap's
        warnings.simplefilter("ignore", RuntimeWarning)  # own seeding of NumPy's global RNG
        warnings.simplefilter("ignore", FutureWarning)
        shap.summary_plot(
            contributions.values,
            colour,
            feature_names=contributions.features,
            max_display=20,
            show=False,
        )
    fig = plt.gcf()
    explained = sorted(set(contributions.explains))
    fig.suptitle(f"SHAP contributions (validation) to {', '.join(explained)[:80]}", fontsize=9)
    mlflow.log_figure(fig, "plots/shap_summary.png")
    plt.close(fig)
