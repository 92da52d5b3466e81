"""ONNX converters for the declarative feature transforms that have a plain ONNX form.

``log`` (:class:`mlops.features.Log1p`: ``log(max(x, 0) + 1)``) and ``clip``
(:class:`mlops.features.Clip`) are registered with skl2onnx here; ``bins`` is scikit-learn's
``KBinsDiscretizer``, which skl2onnx converts itself. ``date``, ``tfidf`` and ``frequency`` read
strings in ways ONNX has no operator for (date parsing, scikit-learn's tokenizer, a lookup of
training shares), so a pipeline holding one is refused by :func:`refuse_unconvertible`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlops.errors import ExportError

CONVERTIBLE = ("Log1p", "Clip")  # mlops.features classes with a converter below


def refuse_unconvertible(preprocess: Any) -> None:
    """Raise :class:`ExportError` naming the first ``data.features`` column whose transform
    has no ONNX converter."""
    from mlops.features import describe_entry

    for entry, transformer, _ in preprocess.transformers_:
        described = describe_entry(entry, transformer)
        if described is None:
            continue
        column, kind = described
        for _, step in getattr(transformer, "steps", [(kind, transformer)]):
            cls = type(step)
            if cls.__module__ == "mlops.features" and cls.__name__ not in CONVERTIBLE:
                raise ExportError(
                    f"column {column!r}: data.features transform {kind!r} "
                    f"({cls.__module__}.{cls.__name__}) has no ONNX converter; export a version "
                    "trained without it, or serve this one natively"
                )


def register_converters() -> None:
    """Make skl2onnx convert :class:`~mlops.features.Log1p` and :class:`~mlops.features.Clip`
    (idempotent)."""
    from skl2onnx import update_registered_converter

    from mlops.features import Clip, Log1p

    update_registered_converter(Log1p, "MlopsLog1p", _same_shape, _convert_log1p)
    update_registered_converter(Clip, "MlopsClip", _same_shape, _convert_clip)


def _same_shape(operator: Any) -> None:
    (source,) = operator.inputs
    operator.outputs[0].type = source.type.__class__([source.get_first_dimension(), 1])


def _convert_log1p(scope: Any, operator: Any, container: Any) -> None:
    from skl2onnx.algebra.onnx_ops import OnnxAdd, OnnxLog, OnnxMax

    opv = container.target_opset
    zero, one = np.array([0.0], dtype=np.float32), np.array([1.0], dtype=np.float32)
    x = operator.inputs[0]
    y = OnnxLog(
        OnnxAdd(OnnxMax(x, zero, op_version=opv), one, op_version=opv),
        op_version=opv,
        output_names=operator.outputs[:1],
    )
    y.add_to(scope, container)


def _convert_clip(scope: Any, operator: Any, container: Any) -> None:
    from skl2onnx.algebra.onnx_ops import OnnxClip

    step = operator.raw_operator
    opv = container.target_opset
    low = -np.inf if step.min is None else float(step.min)
    high = np.inf if step.max is None else float(step.max)
    bounds = np.array([low], dtype=np.float32), np.array([high], dtype=np.float32)
    y = OnnxClip(
        operator.inputs[0],
        bounds[0].reshape(()),
        bounds[1].reshape(()),
        op_version=opv,
        output_names=operator.outputs[:1],
    )
    y.add_to(scope, container)
