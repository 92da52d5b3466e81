"""``mlops export``: a registered version as one ONNX graph, logged only after parity passed.

The version is downloaded and verified against the checksum recorded at registration, and its
pipeline file against the sha256 in ``metadata.json``, before anything of it is deserialised.
The WHOLE pipeline (preprocessing and model) is converted: skl2onnx for the scikit-learn
families, skl2onnx plus tf2onnx for ``keras_mlp`` (:mod:`mlops.export_keras`).

The graph keeps one input/output contract (:func:`io_contract`), which the serving side relies
on: one input per feature column named as the column, shape ``[None, 1]``, float32 for a numeric
column (NaN is missing) and string for a categorical one (``""`` is missing); outputs ``label``
(int64 index into the metadata's classes) and ``probabilities`` (float32 ``[N, n_classes]``)
for classification, ``variable`` (float32 ``[N, 1]``) for regression.

Parity is checked on the run's held-out test split (:func:`mlops.lineage.load_logged_split`):
float32 values within ``export.tolerance`` of the native ones and the same labels (except rows
whose two highest native probabilities are within :data:`BOUNDARY`); a quantized variant (int8
or fp16) may lose at most ``export.max_metric_drop`` of accuracy (or add that much RMSE).
Only then are ``onnx/<variant>/<sha>/model.onnx`` and ``report.json`` logged to the version's run
and the version tagged ``mlops.onnx.<variant>.sha256`` / ``.size_ratio``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlops.config import Config
from mlops.errors import ExportError
from mlops.export_parity import MISSING_STRING, check_parity, io_contract, onnx_inputs
from mlops.serving.onnx_runtime import export_path, sha256_tag

__all__ = [
    "ExportResult",
    "check_parity",
    "convert",
    "export",
    "io_contract",
    "onnx_inputs",
    "tag_names",
]

logger = logging.getLogger(__name__)

QUANTIZED = ("int8", "fp16")
TAG_PREFIX = "mlops.onnx."  # mlops.onnx.<variant>.sha256 and .size_ratio on the version
EXPORT_OF_TAG = "mlops.onnx_export_of"  # on a version registered by --register


@dataclass(frozen=True)
class ExportResult:
    """What one export produced: the variant, its parity report and where it was logged."""

    name: str
    version: str
    variant: str
    run_id: str
    report: dict[str, Any]
    sha256: str
    registered_version: str | None = None

    @property
    def artifact_path(self) -> str:
        return f"{export_path(self.variant, self.sha256)}/model.onnx"


def tag_names(variant: str) -> tuple[str, str]:
    """The version tags of an export: its sha256 (the name the serving side reads) and its
    size ratio."""
    return sha256_tag(variant), f"{TAG_PREFIX}{variant}.size_ratio"


def export(
    name: str,
    version: str,
    config: Config,
    *,
    quantize: str | None = None,
    register: bool = False,
) -> ExportResult:
    """Convert registered ``name`` version ``version`` to ONNX, check parity on its test split,
    and log it to the version's run (with ``quantize``: an int8 or fp16 variant).

    Raises:
        ExportError: a part of the pipeline has no converter, or parity failed (the worst rows
            are in the message); nothing is logged or tagged then.

    Example:
        >>> result = export("churn-model", "3", load_config(), quantize="int8")
        >>> result.report["metric"]
    """
    import mlflow

    from mlops.registry import canonical_version

    if quantize is not None and quantize not in QUANTIZED:
        raise ExportError(f"--quantize {quantize!r}: choose one of {list(QUANTIZED)}")
    version = canonical_version(version)
    variant = quantize or "float32"
    client = mlflow.MlflowClient()
    source = _version(client, name, version)
    run_id = source.run_id
    if not run_id:
        raise ExportError(
            f"{name} version {version} has no training run; export versions registered by "
            "`mlops train --register`"
        )
    opset = config.export.opset
    with tempfile.TemporaryDirectory(prefix="mlops-export-") as tmp:
        pipeline, meta, native_bytes = _verified_pipeline(name, version, Path(tmp) / "model")
        converted = convert(pipeline, meta, opset, fp16=variant == "fp16")
        model = _quantized(converted, variant, Path(tmp))
        model_bytes = model.SerializeToString()
        report = check_parity(pipeline, meta, model_bytes, run_id, variant, config)
        sha = hashlib.sha256(model_bytes).hexdigest()
        ratio = len(model_bytes) / max(native_bytes, 1)
        report.update(
            {
                "opset": opset,
                "size_bytes": len(model_bytes),
                "native_size_bytes": native_bytes,
                "size_ratio": round(ratio, 4),
                "io_contract": io_contract(meta),
                "classes": meta.get("classes"),
                "task": meta["task"],
                "family": meta.get("family"),
                "sha256": sha,
                "source": {"name": name, "version": version, "run_id": run_id},
            }
        )
        if variant != "float32" and meta.get("family") != "keras_mlp":
            report["note"] = (
                f"no operator of this {meta.get('family')} graph has an {variant} form (the "
                "ONNX-ML tree and linear operators take float32 only): the variant computes as "
                "float32 and is no smaller"
            )
        if not report["passed"]:
            raise ExportError(report["failure"])
        folder = Path(tmp) / variant
        folder.mkdir()
        (folder / "model.onnx").write_bytes(model_bytes)
        (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
        artifact_path = export_path(variant, sha)
        client.log_artifact(run_id, str(folder / "model.onnx"), artifact_path=artifact_path)
        client.log_artifact(run_id, str(folder / "report.json"), artifact_path=artifact_path)
    tags = dict(zip(tag_names(variant), (sha, f"{ratio:.4f}"), strict=True))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    registered = _register_copy(client, name, version, source, tags) if register else None
    logger.info("%s version %s: ONNX %s export logged to run %s", name, version, variant, run_id)
    return ExportResult(name, version, variant, run_id, report, sha, registered)


def _version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    from mlops.errors import RegistryError

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(
            f"{name} version {version} is not in the registry ({exc.error_code}); check the "
            "name and version with `mlops status NAME`"
        ) from None


def _verified_pipeline(name: str, version: str, dst: Path) -> tuple[Any, dict[str, Any], int]:
    """The version's fitted pipeline, its metadata and the pipeline file's size; every file is
    verified (registered checksum, then the pipeline's sha256) before any is read."""
    from mlops.artifacts import PIPELINE_FILE, load_pipeline
    from mlops.scoring.core import _verified_model

    model_dir = _verified_model(name, version, dst)
    meta_path = next(model_dir.rglob("metadata.json"), None)
    pipe_path = next(model_dir.rglob(PIPELINE_FILE), None)
    if meta_path is None or pipe_path is None:
        raise ExportError(
            f"{name} version {version} has no metadata.json or {PIPELINE_FILE}; only models "
            "logged by mlops (skops pipeline) can be exported"
        )
    meta = json.loads(meta_path.read_text())
    pipeline = load_pipeline(pipe_path, sha256=meta.get("pipeline_sha256"))
    return pipeline, meta, pipe_path.stat().st_size


# ---------------------------------------------------------------------------------------------
# conversion


def convert(pipeline: Any, meta: dict[str, Any], opset: int, *, fp16: bool = False) -> Any:
    """The fitted ``pipeline`` (preprocess, model) as one ONNX graph with :func:`io_contract`.

    ``fp16``: a Keras network computes in float16 (inputs and outputs stay float32); the
    ONNX-ML operators of the preprocessing and of scikit-learn models take float32 only, so
    they are left as they are.

    Converted is a copy in which the categorical imputer takes ``""`` as missing (skl2onnx
    converts a string imputer only with a string missing value); the statistics are the same.
    For a tree model (a forest) the copy's numeric scaler is folded into the trees'
    thresholds (:func:`mlops.export_trees.fold_numeric_scaler`), so the graph takes the same
    branches as scikit-learn; ``pipeline`` itself is left as it is.
    """
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    preprocess, estimator = pipeline.steps[0][1], pipeline.steps[-1][1]
    from mlops.export_features import refuse_unconvertible, register_converters

    refuse_unconvertible(preprocess)
    register_converters()
    copied = copy.deepcopy(pipeline)
    for _, transformer, _ in copied.steps[0][1].transformers_:
        for _, step in getattr(transformer, "steps", []):
            if type(step).__name__ == "SimpleImputer" and step.statistics_.dtype == object:
                step.missing_values = MISSING_STRING
    types = [(c, FloatTensorType([None, 1])) for c in meta["numeric_columns"]]
    types += [(c, StringTensorType([None, 1])) for c in meta["categorical_columns"]]
    classify = meta["task"] == "classification"
    if meta.get("family") == "keras_mlp" or type(estimator).__module__.startswith("mlops.models"):
        from mlops.export_keras import join, network_graph

        pre = _skl2onnx(copied.steps[0][1], types, opset, None, "the preprocessing")
        try:
            net = network_graph(copied.steps[-1][1], opset)
        except Exception as exc:  # tf2onnx's own errors: name the network, keep the reason
            raise ExportError(
                f"the Keras network ({type(estimator).__name__}) could not be converted by "
                f"tf2onnx: {exc}"
            ) from exc
        if fp16:
            from onnxconverter_common.float16 import convert_float_to_float16

            net = convert_float_to_float16(net, keep_io_types=True)
        model = join(pre, net)
    else:
        from mlops.export_trees import fold_numeric_scaler

        # a tree compares float32(scaled) with a float64 threshold natively: compare the raw
        # float32 input with the matching float32 raw threshold instead (mlops.export_trees)
        folded = fold_numeric_scaler(copied)
        if folded:
            logger.debug("folded the numeric scaler into %d tree thresholds", folded)
        options = {id(copied.steps[-1][1]): {"zipmap": False}} if classify else None
        model = _skl2onnx(copied, types, opset, options, type(estimator).__name__)
    columns = list(meta["numeric_columns"]) + list(meta["categorical_columns"])
    return _named_outputs(_named_inputs(model, columns), classify)


def _named_inputs(model: Any, columns: list[str]) -> Any:
    """``model`` with its inputs named exactly as the columns, in order: skl2onnx makes a name
    like ``mean radius`` a C identifier (``mean_radius``), and the contract is the column's own
    name."""
    graph = model.graph
    if len(graph.input) != len(columns):
        raise ExportError(
            f"the converted graph has {len(graph.input)} inputs for {len(columns)} columns"
        )
    renamed = {i.name: c for i, c in zip(graph.input, columns, strict=True) if i.name != c}
    if not renamed:
        return model
    for value in graph.input:
        value.name = renamed.get(value.name, value.name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    return model


def _skl2onnx(obj: Any, types: list[Any], opset: int, options: Any, what: str) -> Any:
    from skl2onnx import convert_sklearn

    try:
        with _tree_ensemble_fix():
            return convert_sklearn(obj, initial_types=types, target_opset=opset, options=options)
    except Exception as exc:  # skl2onnx names the operator it has no converter for
        raise ExportError(
            f"{what} could not be converted to ONNX by skl2onnx "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


@contextmanager
def _tree_ensemble_fix() -> Iterator[None]:
    """skl2onnx passes a Python ``False`` as a leaf's missing-value flag of a
    HistGradientBoosting tree, which current protobuf refuses in an int list; pass it as 0."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        if "nodes_missing_value_tracks_true" in kwargs:
            kwargs["nodes_missing_value_tracks_true"] = int(
                kwargs["nodes_missing_value_tracks_true"]
            )
        return original(*args, **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def _named_outputs(model: Any, classify: bool) -> Any:
    """``model`` with the contract's output names: ``label`` (int64 argmax) and
    ``probabilities`` for a classifier, ``variable`` (``[N, 1]``) for a regressor."""
    from onnx import TensorProto, helper

    graph = model.graph
    outputs = list(graph.output)
    scores = outputs[-1] if classify else outputs[0]
    wanted = ("label", "probabilities") if classify else ("variable",)
    if [o.name for o in outputs] == list(wanted):
        return model
    del graph.output[:]
    if classify:
        graph.node.append(helper.make_node("Identity", [scores.name], ["probabilities"]))
        graph.node.append(helper.make_node("ArgMax", [scores.name], ["label"], axis=1, keepdims=0))
        graph.output.extend(
            [
                helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, None]),
            ]
        )
    else:
        shape = helper.make_tensor(
            "variable_shape", TensorProto.INT64, [2], np.array([-1, 1], dtype=np.int64)
        )
        graph.initializer.append(shape)
        graph.node.append(
            helper.make_node("Reshape", [scores.name, "variable_shape"], ["variable"])
        )
        graph.output.append(helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1]))
    return model


def _quantized(model: Any, variant: str, tmp: Path) -> Any:
    """``model`` as ``variant``: int8 by dynamic quantization of its weights (MatMul/Gemm: a
    Keras network; tree and linear ONNX-ML operators stay as they are); float32 and fp16 as
    :func:`convert` made them."""
    import onnx

    if variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src, dst = tmp / "float32.onnx", tmp / "int8.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return onnx.load(str(dst))
    return model


def _register_copy(client: Any, name: str, version: str, source: Any, tags: dict[str, str]) -> str:
    """A new version of ``name`` from the same run and model files, with the original's mlops
    tags (its checksum: the files are the same), the export tags and :data:`EXPORT_OF_TAG`, so
    it passes the gates like any version."""
    from mlops.registry.promotion import CREATOR_TAG, current_user

    copied = client.create_model_version(
        name,
        source.source,
        run_id=source.run_id,
        description=f"ONNX export of version {version} (same model files, run {source.run_id})",
    )
    new_tags = {k: v for k, v in (source.tags or {}).items() if k.startswith("mlops.")}
    new_tags.update({**tags, EXPORT_OF_TAG: version, CREATOR_TAG: current_user()})
    for key, value in new_tags.items():
        client.set_model_version_tag(name, copied.version, key, value)
    return str(copied.version)
