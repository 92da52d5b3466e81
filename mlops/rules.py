"""Data quality rules (``data.rules``): checked on datasets at prepare/train and on served rows.

Row rules (``min``, ``max``, ``allowed``, ``not_null``) are checked on every row; a null
breaks only ``not_null``. ``allowed`` compares as numbers on a numeric column and as text on
any other. Dataset rules (``max_null_share`` of a column, ``max_duplicate_share``) are
checked on a whole dataset only.

- :func:`check_dataset` reports a dataset's violations and fails prepare/train when the
  share of rows breaking a row rule passes ``tolerance`` or a dataset rule is exceeded.
- :class:`RowRules` is the same row rules compiled once for a served model: masks over the
  input contract's NumPy arrays, so a request costs a few vectorised comparisons.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from mlops.config import ColumnRule, RulesConfig
from mlops.errors import DataValidationError

MAX_EXAMPLES = 5  # example rows per broken rule in a report
_QUOTE_CHARS = 100  # the most of one value a message quotes


def check_dataset(
    frame: pd.DataFrame, rules: RulesConfig, *, source: str, strings: Sequence[str] = ()
) -> dict[str, Any] | None:
    """The quality report of ``frame`` (None when no rule is configured); raises
    ``DataValidationError`` when violations pass ``rules.tolerance``. ``strings``: the
    columns the model takes as text (declared categorical, or read by a text transform), whose
    rules compare as text whatever the file holds (``zip: 1000`` is the text "1000").

    The report lists, per broken row rule, its column, rule, limit, count of rows and up to
    :data:`MAX_EXAMPLES` example rows; and each dataset rule with the share it measured.

    Example:
        >>> rules = RulesConfig(columns={"age": {"max": 120}}, tolerance=0.05)
        >>> check_dataset(frame, rules, source="data/people.csv")["violations"]
    """
    if not rules.columns and rules.max_duplicate_share is None:
        return None
    unknown = [c for c in rules.columns if c not in frame.columns]
    if unknown:
        raise DataValidationError(
            f"data.rules.columns names {unknown}, not column(s) of {source} (its columns: "
            f"{_quote(list(map(str, frame.columns)))}); fix the name or remove the rule"
        )
    n = len(frame)
    broken = np.zeros(n, dtype=bool)
    violations: list[dict[str, Any]] = []
    dataset: list[dict[str, Any]] = []
    for col, rule in rules.columns.items():
        series = frame[col]
        for name, limit, mask in _row_masks(col, series, rule, source, text=col in strings):
            count = int(mask.sum())
            if count:
                broken |= mask
                violations.append(
                    {
                        "column": col,
                        "rule": name,
                        "limit": limit,
                        "count": count,
                        "examples": _examples(frame, mask),
                    }
                )
        if rule.max_null_share is not None:
            share = float(series.isna().mean()) if n else 0.0
            dataset.append(_dataset_rule(col, "max_null_share", rule.max_null_share, share))
    if rules.max_duplicate_share is not None:
        share = float(frame.duplicated().mean()) if n else 0.0
        dataset.append(_dataset_rule(None, "max_duplicate_share", rules.max_duplicate_share, share))
    rows_broken = int(broken.sum())
    share_broken = rows_broken / n if n else 0.0
    failed = [d for d in dataset if not d["passed"]]
    report: dict[str, Any] = {
        "source": source,
        "rows": n,
        "tolerance": rules.tolerance,
        "rows_violating": rows_broken,
        "share_violating": share_broken,
        "violations": violations,
        "dataset": dataset,
        "passed": share_broken <= rules.tolerance and not failed,
    }
    if share_broken > rules.tolerance:
        worst = max(violations, key=lambda v: v["count"])
        example = worst["examples"][0][worst["column"]] if worst["examples"] else None
        others = [f"{_label(v['column'], v['rule'], v['limit'])} {v['count']}" for v in violations]
        raise DataValidationError(
            f"{source} breaks data.rules: column '{worst['column']}' {_broken(worst)} in "
            f"{worst['count']} of {n} rows (e.g. {_quote(example)}); {rows_broken} row(s) "
            f"({share_broken:.1%}) break a rule, more than data.rules.tolerance "
            f"{rules.tolerance:g} (all: {'; '.join(others)}); fix the data, the rule, or raise "
            "the tolerance"
        )
    if failed:
        d = failed[0]
        what = f"column '{d['column']}' is null" if d["column"] else "rows are duplicates"
        raise DataValidationError(
            f"{source} breaks data.rules: {what} in {d['share']:.1%} of {n} rows, more than "
            f"its {d['rule']} {d['limit']:g}; fix the data or the rule"
        )
    return report


def keeping(frame: pd.DataFrame, rules: RulesConfig) -> np.ndarray:
    """A mask of the rows of ``frame`` that break no row rule (rules on absent columns are
    not checked): where a model's input example and sample come from."""
    keep = np.ones(len(frame), dtype=bool)
    for col, rule in rules.columns.items():
        if col in frame.columns:
            for _, _, broken in _row_masks(col, frame[col], rule, "the training data"):
                keep &= ~broken
    return keep


def summary(report: dict[str, Any]) -> str | None:
    """One line on a report's violations (None when it has none), for a terminal."""
    parts = [
        f"{_label(v['column'], v['rule'], v['limit'])} {v['count']}" for v in report["violations"]
    ]
    if not parts:
        return None
    return (
        f"data quality: {report['rows_violating']} of {report['rows']} rows "
        f"({report['share_violating']:.1%}) break a rule, within tolerance "
        f"{report['tolerance']:g}: {'; '.join(parts)}"
    )


def _row_masks(
    col: str, series: pd.Series, rule: ColumnRule, source: str, *, text: bool = False
) -> list[tuple[str, Any, np.ndarray]]:
    numeric = ptypes.is_numeric_dtype(series) and not text
    present = series.notna().to_numpy()
    out: list[tuple[str, Any, np.ndarray]] = []
    for name, limit in (("min", rule.min), ("max", rule.max)):
        if limit is None:
            continue
        if not numeric:
            kind = (
                "a text column of the model (declared in data.categorical, or read by a text "
                "transform)"
                if text
                else f"not numeric (dtype {series.dtype})"
            )
            raise DataValidationError(
                f"data.rules.columns.{col}.{name}: column '{col}' of {source} is {kind}; min "
                "and max apply to numbers, use 'allowed' for categories"
            )
        values = series.to_numpy(dtype=float, na_value=np.nan)
        out.append((name, limit, values < limit if name == "min" else values > limit))
    if rule.allowed is not None:
        if numeric:
            allowed = _numbers(rule.allowed, f"data.rules.columns.{col}.allowed", col)
            inside = series.isin(allowed).to_numpy()
        else:
            inside = series.astype(str).isin([str(a) for a in rule.allowed]).to_numpy()
        out.append(("allowed", list(rule.allowed), present & ~inside))
    if rule.not_null:
        out.append(("not_null", True, ~present))
    return out


def _numbers(values: list[Any], key: str, col: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataValidationError(
            f"{key}: column '{col}' is numeric but {_quote(values)} are not all numbers; list "
            "numbers"
        ) from None


def _examples(frame: pd.DataFrame, mask: np.ndarray) -> list[dict[str, Any]]:
    rows = frame.loc[mask].head(MAX_EXAMPLES)
    records: list[dict[str, Any]] = json.loads(
        rows.to_json(orient="records", date_format="iso", default_handler=str)
    )
    return records


def _dataset_rule(col: str | None, rule: str, limit: float, share: float) -> dict[str, Any]:
    return {"column": col, "rule": rule, "limit": limit, "share": share, "passed": share <= limit}


def _label(col: str, rule: str, limit: Any) -> str:
    """A rule a row broke, short: ``age>max(120)``, ``plan not in allowed``, ``age is null``."""
    if rule == "min":
        return f"{col}<min({limit:g})"
    if rule == "max":
        return f"{col}>max({limit:g})"
    if rule == "allowed":
        return f"{col} not in allowed"
    return f"{col} is null"


def _broken(v: dict[str, Any]) -> str:
    rule, limit = v["rule"], v["limit"]
    if rule == "min":
        return f"is below its min {limit:g}"
    if rule == "max":
        return f"is above its max {limit:g}"
    if rule == "allowed":
        return f"is not one of its allowed values {_quote(limit)}"
    return "is null (not_null)"


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."


# ---- served rows ----
@dataclass(frozen=True)
class _Check:
    column: str
    rule: str  # min | max | allowed | not_null
    limit: Any
    label: str  # e.g. "age>max(120)"
    numeric: bool  # a column of the numeric array (else of the categorical one)
    index: int  # its position in that array
    broken: Callable[[np.ndarray], np.ndarray]  # the column's values -> a row mask


@dataclass(frozen=True)
class RowViolations:
    """The rows of one request that broke a rule: which rule, where."""

    checks: list[tuple[_Check, np.ndarray]]  # each rule broken by some row, and its row mask
    counts: np.ndarray  # per row: how many rules it broke

    @property
    def rows(self) -> int:
        """Rows that broke at least one rule."""
        return int(np.count_nonzero(self.counts))

    def labels(self) -> np.ndarray:
        """Per row the rules it broke (``"age>max(120);plan not in allowed"``), "" for none."""
        text = np.full(self.counts.shape[0], "", dtype=object)
        for check, mask in self.checks:
            for i in np.flatnonzero(mask).tolist():
                text[i] = f"{text[i]};{check.label}" if text[i] else check.label
        return text

    def message(self, numeric: np.ndarray, categorical: np.ndarray | None) -> str:
        """The refusal of the first broken row: column, rule, limit, value, row number."""
        row = int(np.flatnonzero(self.counts)[0])
        check = next(c for c, mask in self.checks if mask[row])
        source = numeric if check.numeric else categorical
        assert source is not None  # a categorical rule is only compiled for categorical columns
        value = source[row, check.index]
        if isinstance(value, np.generic):
            value = value.item()
        null = value is None or (isinstance(value, float) and value != value)
        if check.rule == "not_null":
            what = "must not be null (not_null)"
        else:
            what = _broken({"rule": check.rule, "limit": check.limit})
        sent = "null" if null else _quote(value)
        more = f" ({self.rows} rows of this request break a rule)" if self.rows > 1 else ""
        return (
            f"column '{check.column}' {what} (data.rules), got {sent} in row {row}{more}; send "
            "values the model's data rules allow"
        )


class RowRules:
    """``data.rules`` compiled for a served model's input arrays (numeric float columns and
    categorical object columns, in the contract's order). Rules on columns the model does not
    take (the target, say) are not checked at serving."""

    def __init__(self, checks: list[_Check]) -> None:
        self.checks = checks

    @classmethod
    def build(
        cls, rules: dict[str, Any] | None, numeric: list[str], categorical: list[str]
    ) -> RowRules | None:
        """The served form of a model's ``rules`` (metadata.json); None when no row rule
        applies to its input (no extra work per request then)."""
        if not rules:
            return None
        config = RulesConfig.model_validate(rules)
        num_at = {c: j for j, c in enumerate(numeric)}
        cat_at = {c: j for j, c in enumerate(categorical)}
        checks: list[_Check] = []
        for col, rule in config.columns.items():
            if col in num_at:
                j = num_at[col]
                if rule.min is not None:
                    checks.append(_numeric(col, "min", rule.min, j, _below(rule.min)))
                if rule.max is not None:
                    checks.append(_numeric(col, "max", rule.max, j, _above(rule.max)))
                if rule.allowed is not None:
                    allowed = np.asarray(_numbers(rule.allowed, "rules", col), dtype=float)
                    checks.append(_numeric(col, "allowed", rule.allowed, j, _not_in(allowed)))
                if rule.not_null:
                    checks.append(_numeric(col, "not_null", True, j, np.isnan))
            elif col in cat_at:  # min/max on a category: refused when the data was prepared
                j = cat_at[col]
                if rule.allowed is not None:
                    names = frozenset(str(a) for a in rule.allowed)
                    checks.append(
                        _Check(
                            col,
                            "allowed",
                            rule.allowed,
                            _label(col, "allowed", None),
                            False,
                            j,
                            _not_among(names),
                        )
                    )
                if rule.not_null:
                    checks.append(
                        _Check(
                            col, "not_null", True, _label(col, "not_null", None), False, j, _null
                        )
                    )
        return cls(checks) if checks else None

    def check(self, numeric: np.ndarray, categorical: np.ndarray | None) -> RowViolations | None:
        """The violations of a request's rows; None when every row keeps every rule."""
        found = []
        for check in self.checks:
            source = numeric if check.numeric else categorical
            if source is None:
                continue
            mask = check.broken(source[:, check.index])
            if mask.any():
                found.append((check, mask))
        if not found:
            return None
        counts = np.zeros(numeric.shape[0], dtype=np.int64)
        for _, mask in found:
            counts += mask
        return RowViolations(found, counts)


def _numeric(
    col: str, rule: str, limit: Any, j: int, broken: Callable[[np.ndarray], np.ndarray]
) -> _Check:
    return _Check(col, rule, limit, _label(col, rule, limit), True, j, broken)


def _below(limit: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda values: values < limit  # NaN (null) compares False


def _above(limit: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda values: values > limit


def _not_in(allowed: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda values: ~np.isin(values, allowed) & ~np.isnan(values)


def _not_among(names: frozenset[str]) -> Callable[[np.ndarray], np.ndarray]:
    def broken(values: np.ndarray) -> np.ndarray:
        return np.fromiter(
            (isinstance(v, str) and v not in names for v in values.tolist()),
            dtype=bool,
            count=values.shape[0],
        )

    return broken


def _null(values: np.ndarray) -> np.ndarray:
    return np.fromiter(
        (not isinstance(v, str) for v in values.tolist()), dtype=bool, count=values.shape[0]
    )
