"""Declarative feature transforms (``data.features``), fitted inside the logged pipeline.

Each configured column gets its own transform; a column whose transform reads text (dates, free
text, frequency encoding) is a string column of the input contract.
"""

from __future__ import annotations

from typing import Any

# transforms whose input column holds strings (dates are parsed inside the pipeline)
STRING_TRANSFORMS = frozenset({"date", "tfidf", "frequency"})


def string_columns(features: dict[str, dict[str, Any]]) -> list[str]:
    """The feature columns whose configured transform takes strings (in config order)."""
    return [
        col
        for col, spec in features.items()
        if spec.get("transform") in STRING_TRANSFORMS or spec.get("input") == "string"
    ]
