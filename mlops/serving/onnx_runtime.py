"""Scoring through a registered version's ONNX export with ONNX Runtime (``serving.runtime``).

``mlops export NAME --version V --format onnx`` writes ``onnx/<variant>/<sha>/model.onnx`` to the
version's run and, only when its answers matched the native pipeline's, tags the version with
``mlops.onnx.<variant>.sha256``. At load, :func:`load_runtime` picks what a version is served
with: ``native`` (the fitted pipeline), ``onnx`` (the export, or no start) or ``auto`` (the
export where the tag says it passed, else native). The export's bytes are checked against the
tag before ONNX Runtime parses them, as every model file is (see ``mlops.artifacts``), and the
graph's inputs and outputs are checked against the model's input contract.

The graph takes one input per feature column, named as the column, shaped ``[N, 1]``: float32
for a numeric column (NaN for missing), string for a categorical one (``""`` for missing). A
classifier answers ``label`` (an index into the classes) and ``probabilities``
(``[N, n_classes]``), a regressor ``variable`` (``[N, 1]``).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "native", "onnx")
VARIANTS = ("float32", "int8", "fp16")
MODEL_FILE = "model.onnx"
LABEL, PROBABILITIES, VARIABLE = "label", "probabilities", "variable"


def export_path(variant: str, sha256: str) -> str:
    """Where a version's run holds the ``variant`` export whose model.onnx hashes to
    ``sha256`` (a folder of its artifacts). Keyed by the checksum, so a later export on the
    same run (another opset, another version registered from the run) never replaces a file a
    version's tag points at."""
    return f"onnx/{variant}/{sha256[:16]}"


def sha256_tag(variant: str) -> str:
    """The version tag holding the export's SHA-256, set only when its parity check passed."""
    return f"mlops.onnx.{variant}.sha256"


def export_command(name: str, version: str) -> str:
    return f"mlops export {name} --version {version} --format onnx"


BATCH_ROWS = 256  # from this many rows a request runs on the batch session (several threads)


class OnnxScorer:
    """ONNX Runtime sessions over a verified export, fed the wrapper's parsed arrays: one tuned
    for small requests (:func:`session_options`), and, built at the first request of
    :data:`BATCH_ROWS` rows or more from the same verified bytes, one for batches
    (:func:`batch_session_options`)."""

    def __init__(
        self,
        session: Any,
        variant: str,
        numeric: Sequence[str],
        categorical: Sequence[str],
        data: bytes | None = None,
    ) -> None:
        self.session = session
        self.variant = variant
        self.numeric, self.categorical = list(numeric), list(categorical)
        outputs = {o.name for o in session.get_outputs()}
        self.output = PROBABILITIES if PROBABILITIES in outputs else VARIABLE
        self._data = data  # the verified bytes the batch session is made from
        self._batch: Any = None
        self._lock = threading.Lock()

    def session_for(self, rows: int) -> Any:
        """The session a request of ``rows`` rows runs on."""
        if rows < BATCH_ROWS or self._data is None:
            return self.session
        if self._batch is None:
            with self._lock:
                if self._batch is None:
                    import onnxruntime as ort

                    self._batch = ort.InferenceSession(
                        self._data,
                        sess_options=batch_session_options(),
                        providers=["CPUExecutionProvider"],
                    )
        return self._batch

    def feeds(self, numeric: np.ndarray, categorical: np.ndarray | None) -> dict[str, np.ndarray]:
        """One ``[N, 1]`` array per graph input: float32 numbers (NaN stays NaN), strings with
        a missing value (None, NaN) as ``""``."""
        out: dict[str, np.ndarray] = {}
        if self.numeric:
            block = np.asarray(numeric, dtype=np.float32)
            for j, col in enumerate(self.numeric):
                out[col] = np.ascontiguousarray(block[:, j : j + 1])
        if self.categorical:
            assert categorical is not None  # parsed whenever the model has categorical columns
            for j, col in enumerate(self.categorical):
                values = categorical[:, j]
                column = np.empty((values.shape[0], 1), dtype=object)
                column[:, 0] = [v if isinstance(v, str) else "" for v in values.tolist()]
                out[col] = column
        return out

    def run(self, numeric: np.ndarray, categorical: np.ndarray | None) -> np.ndarray:
        """Class probabilities ``[N, n_classes]`` (a classifier) or values ``[N]`` (a
        regressor), as float64 like the native path's."""
        session = self.session_for(numeric.shape[0])
        try:
            (result,) = session.run([self.output], self.feeds(numeric, categorical))
        except UnicodeEncodeError:
            raise self._not_utf8(categorical) from None
        values = np.asarray(result, dtype=np.float64)
        return values if self.output == PROBABILITIES else values.reshape(-1)

    def _not_utf8(self, categorical: np.ndarray | None) -> Exception:
        """The 400 for text ONNX Runtime cannot take (a lone surrogate such as "\\ud800",
        which JSON can carry and UTF-8 cannot), naming the first such column and row."""
        from mlops.serving.inputs import clip, invalid

        if categorical is not None:
            for j, col in enumerate(self.categorical):
                for i, value in enumerate(categorical[:, j].tolist()):
                    if isinstance(value, str):
                        try:
                            value.encode("utf-8")
                        except UnicodeEncodeError:
                            return invalid(
                                f"column '{col}' in row {i} holds text that is not valid "
                                f"Unicode ({clip(value)}: a lone surrogate); send UTF-8 text"
                            )
        return invalid("the request holds text that is not valid Unicode; send UTF-8 text")


def session_options() -> Any:
    """ONNX Runtime options tuned for the latency of small requests.

    A served request is one to a few rows: splitting its few small kernels over threads costs
    more in hand-offs than it saves, and a scoring server already runs requests side by side
    (its workers and threads), so each session computes on the calling thread alone
    (``intra_op_num_threads=1``, ``inter_op_num_threads=1``, sequential execution: no thread
    pool to wake, no spinning threads competing with the server's). Every graph optimisation
    is applied once at load (``ORT_ENABLE_ALL``: constant folding, node fusions, layout).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings would go to the server's stderr
    return options


def load_runtime(
    runtime: str,
    variant: str,
    *,
    name: str,
    version: str,
    registered: Any,
    numeric: Sequence[str],
    categorical: Sequence[str],
    n_classes: int | None,
) -> OnnxScorer | None:
    """The ONNX scorer this version is served with, or None to serve it natively.

    Args:
        runtime: ``auto`` | ``native`` | ``onnx`` (serving option ``runtime``).
        variant: ``float32`` | ``int8`` | ``fp16`` (serving option ``onnx_variant``).
        registered: the registered version (an MLflow ``ModelVersion``: its tags and run),
            or None where it is not known (a model loaded from a path, a bundled copy).
        n_classes: the number of classes of a classifier, None for a regressor.

    Raises:
        MlflowException: ``onnx`` without an export (naming the command that makes one), an
            export whose bytes differ from the tagged checksum (any runtime), or a graph that
            does not fit the model's input contract.
    """
    if runtime not in RUNTIMES:
        raise MlflowException(
            f"serving option runtime is {runtime!r}; use one of {', '.join(RUNTIMES)}"
        )
    if variant not in VARIANTS:
        raise MlflowException(
            f"serving option onnx_variant is {variant!r}; use one of {', '.join(VARIANTS)}"
        )
    if runtime == "native":
        return None
    tags = (getattr(registered, "tags", None) or {}) if registered is not None else {}
    recorded = tags.get(sha256_tag(variant))
    if not recorded:
        if runtime == "onnx" and registered is None:
            raise MlflowException(
                f"{name} version {version} is to be served with runtime onnx, but it was not "
                "loaded as a registered version, so its ONNX export cannot be found; load it as "
                "models:/NAME/VERSION (or by alias), or serve it with runtime auto or native"
            )
        if runtime == "onnx":
            quantize = "" if variant == "float32" else f" --quantize {variant}"
            raise MlflowException(
                f"{name} version {version} is to be served with runtime onnx, but it has no "
                f"{variant} ONNX export that passed its parity check (no tag "
                f"{sha256_tag(variant)}); run `{export_command(name, version)}{quantize}`, or "
                "serve it with runtime auto or native"
            )
        logger.info(
            "%s version %s has no %s ONNX export: serving it natively",
            name,
            version,
            variant,
        )
        return None
    data = _download(registered.run_id, variant, recorded, name=name, version=version)
    _verify(
        data,
        recorded,
        f"{name} version {version}: {export_path(variant, recorded)}/{MODEL_FILE}",
    )
    session = _session(data, name=name, version=version, variant=variant)
    _check_graph(session, numeric, categorical, n_classes, f"{name} version {version}")
    return OnnxScorer(session, variant, numeric, categorical, data)


def _download(run_id: str, variant: str, sha256: str, *, name: str, version: str) -> bytes:
    """The export's bytes, from the version's run (only the model file: nothing else of the
    export is trusted or needed)."""
    import mlflow

    path = f"{export_path(variant, sha256)}/{MODEL_FILE}"
    try:
        with tempfile.TemporaryDirectory(prefix="mlops-onnx-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=tmp
            )
            return Path(local).read_bytes()
    except Exception as exc:  # a missing file, an unreachable store: no start, said plainly
        raise MlflowException(
            f"{name} version {version} is tagged {sha256_tag(variant)} but its export "
            f"{path} could not be read from run {run_id} ({type(exc).__name__}: {exc}); "
            f"export it again with `{export_command(name, version)}`"
        ) from None


def _verify(data: bytes, recorded: str, what: str) -> None:
    """Refuse bytes that are not the ones tagged, before anything parses them."""
    from mlops.artifacts import UntrustedArtifact, verify_checksum

    try:
        verify_checksum(hashlib.sha256(data).hexdigest(), recorded, what)
    except UntrustedArtifact as exc:
        raise MlflowException(str(exc)) from None


def batch_session_options() -> Any:
    """ONNX Runtime options for batches (:data:`BATCH_ROWS` rows or more): the operators'
    work split over the machine's cores (``intra_op_num_threads=0``: ONNX Runtime's default,
    one per physical core), which pays once a request holds enough rows to share; threads do
    not spin between requests (``session.intra_op.allow_spinning=0``), so an idle batch session
    takes no CPU from the small requests' one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _session(data: bytes, *, name: str, version: str, variant: str) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            data, sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # verified bytes that ONNX Runtime cannot run (an old runtime)
        raise MlflowException(
            f"{name} version {version}: ONNX Runtime {ort.__version__} cannot load its "
            f"{variant} export ({type(exc).__name__}: {str(exc)[:300]}); serve it with "
            "runtime native, or install the onnxruntime the export was checked with"
        ) from None


def _check_graph(
    session: Any,
    numeric: Sequence[str],
    categorical: Sequence[str],
    n_classes: int | None,
    what: str,
) -> None:
    """Refuse a graph whose inputs or outputs are not the model's contract."""
    inputs = {i.name: i.type for i in session.get_inputs()}
    wanted = {c: "tensor(float)" for c in numeric} | {c: "tensor(string)" for c in categorical}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    problems = []
    if inputs != wanted:
        problems.append(f"its inputs are {inputs}, the model's columns {wanted}")
    needed = PROBABILITIES if n_classes is not None else VARIABLE
    if needed not in outputs:
        problems.append(f"it has no output '{needed}' (outputs: {sorted(outputs)})")
    elif n_classes is not None:
        width = outputs[needed][-1] if outputs[needed] else None
        if isinstance(width, int) and width != n_classes:
            problems.append(f"'{needed}' has {width} columns for {n_classes} classes")
    if problems:
        raise MlflowException(
            f"{what}: its ONNX export does not fit the model: {'; '.join(problems)}; export it "
            "again"
        )
