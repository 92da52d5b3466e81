"""Row-by-row verdicts of the served model's input contract, for batch scoring.

The contract (:class:`mlops.serving.inputs.InputContract`) refuses a whole request at its first
bad value; a batch job instead sets bad rows aside with the reason and scores the rest. A
chunk is checked whole first (the common case: one pass, nothing refused); when it is refused,
it is halved until the refused rows are found, and each is checked alone so that its reason is
the contract's own message. Columns a whole file lacks are not a row's fault: they stop the job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlops.errors import DataValidationError
from mlops.rules import RowRules
from mlops.serving.inputs import CSV_NULLS, Arrays, InputContract, InvalidInput

REASON_COLUMN = "reason"
RUN_ID_COLUMN = "scoring_run_id"
_LEAF_ROWS = 16  # below this many rows a refused piece is checked row by row
_IN_ROW = re.compile(r" in row \d+")


@dataclass(frozen=True)
class Checked:
    """One chunk split by the contract: the rows it accepts (and their parsed arrays), the
    refused rows with a ``reason`` column, and each refused row's reason by its position."""

    good: pd.DataFrame
    arrays: Arrays | None
    rejects: pd.DataFrame
    reasons: dict[int, str]


def check_columns(contract: InputContract, columns: Sequence[object], where: str) -> None:
    """Refuse a table (not its rows) that lacks a model column or names one twice."""
    names = pd.Index(columns)
    if names.has_duplicates:
        repeated = names[names.duplicated()][0]
        raise DataValidationError(f"{where}: {contract.repeated(repeated).detail}")
    missing = [c for c in contract.features if c not in names]
    if missing:
        raise DataValidationError(f"{where}: {contract.missing(missing).detail}")


def from_text(contract: InputContract, frame: pd.DataFrame) -> pd.DataFrame:
    """A CSV chunk's model columns as the contract reads CSV: a null word (``NA``, empty) is
    null, a numeric column's decimal text a number; text that is no number stays text, for the
    contract to refuse by name."""
    frame = frame.copy()
    for col in contract.features:
        values = frame[col]
        if values.dtype != object:
            continue
        nulls = values.isin(CSV_NULLS)
        if col in contract.numeric:
            numbers = pd.to_numeric(values.where(~nulls), errors="coerce")
            keep_text = numbers.isna() & ~nulls & values.notna()
            frame[col] = numbers.astype(object).where(~keep_text, values)
            if not keep_text.any():
                frame[col] = numbers
        elif nulls.any():
            frame[col] = values.where(~nulls, None)
    return frame


def reason_of(exc: InvalidInput) -> str:
    """A refusal of one row, without the row number (that row is the reject itself)."""
    return _IN_ROW.sub("", exc.detail)


def split_rows(contract: InputContract, frame: pd.DataFrame) -> Checked:
    """``frame`` split into the rows the contract accepts and those it refuses (with reasons).

    ``frame`` must hold every model column (:func:`check_columns`) and at most
    ``contract.max_rows`` rows.
    """
    frame = frame.reset_index(drop=True)
    empty = frame.iloc[:0].assign(**{REASON_COLUMN: pd.Series([], dtype=object)})
    if not len(frame):
        return Checked(frame, None, empty, {})
    try:
        return Checked(frame, contract.from_frame(frame), empty, {})
    except InvalidInput:
        pass
    reasons: dict[int, str] = {}
    _find_refused(contract, frame, 0, len(frame), reasons)
    refused = np.zeros(len(frame), dtype=bool)
    refused[list(reasons)] = True
    good = frame[~refused].reset_index(drop=True)
    rejects = frame[refused].reset_index(drop=True)
    rejects[REASON_COLUMN] = [reasons[i] for i in sorted(reasons)]
    arrays = contract.from_frame(good) if len(good) else None
    return Checked(good, arrays, rejects, reasons)


def _find_refused(
    contract: InputContract, frame: pd.DataFrame, start: int, stop: int, reasons: dict[int, str]
) -> None:
    """Record in ``reasons`` each row of ``frame[start:stop]`` that the contract refuses."""
    if stop - start <= _LEAF_ROWS:
        for i in range(start, stop):
            try:
                contract.from_frame(frame.iloc[i : i + 1])
            except InvalidInput as exc:
                reasons[i] = reason_of(exc)
        return
    middle = (start + stop) // 2
    for lo, hi in ((start, middle), (middle, stop)):
        try:
            contract.from_frame(frame.iloc[lo:hi])
        except InvalidInput:
            _find_refused(contract, frame, lo, hi, reasons)


def check_rows(
    contract: InputContract, rules: RowRules | None, frame: pd.DataFrame, *, text: bool
) -> Checked:
    """``frame`` split by the contract, then by the data rules that refuse rows (``rules``;
    None: none do); ``text``: a CSV's values, read as the contract reads CSV first. What both
    engines hold every row to."""
    return split_by_rules(
        rules, split_rows(contract, from_text(contract, frame) if text else frame)
    )


def split_by_rules(rules: RowRules | None, checked: Checked) -> Checked:
    """``checked`` with the accepted rows that break a data rule (``data.rules``, a model
    served with ``on_rule_violation: reject``) moved to its rejects, each with the rule's own
    refusal as its reason; ``rules`` None (no rules, or flag mode) changes nothing."""
    if rules is None or checked.arrays is None:
        return checked
    numeric, categorical = checked.arrays
    found = rules.check(numeric, categorical)
    if found is None:
        return checked
    broken = found.counts > 0
    total = len(checked.good) + len(checked.reasons)
    positions = [i for i in range(total) if i not in checked.reasons]  # of the accepted rows
    reasons = dict(checked.reasons)
    said = []
    for i in np.flatnonzero(broken).tolist():
        row = numeric[i : i + 1], None if categorical is None else categorical[i : i + 1]
        one = rules.check(*row)
        assert one is not None  # the row broke a rule in the whole, so it does alone
        said.append(_IN_ROW.sub("", one.message(*row)))
        reasons[positions[i]] = said[-1]
    rejects = checked.good[broken].reset_index(drop=True)
    rejects[REASON_COLUMN] = said
    kept = ~broken
    good = checked.good[kept].reset_index(drop=True)
    arrays = (
        (numeric[kept], None if categorical is None else categorical[kept]) if kept.any() else None
    )
    return Checked(good, arrays, pd.concat([checked.rejects, rejects], ignore_index=True), reasons)
