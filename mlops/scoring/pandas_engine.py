"""The ``pandas`` engine: one process streams the input chunk by chunk.

Each chunk (``scoring.chunk_rows`` rows) is read, split by the model's input contract, scored
by the loaded wrapper and appended to the output before the next is read, so memory holds one
chunk and its answer whatever the size of the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mlops.scoring.rows import RUN_ID_COLUMN, Checked, check_columns, from_text, split_rows
from mlops.scoring.sinks import Sink, answer_fields
from mlops.scoring.sources import CSV, Source, read_chunks
from mlops.serving.wrapper import NAME_COLUMN, VERSION_COLUMN


@dataclass(frozen=True)
class Counts:
    """Rows an engine scored and rows it set aside."""

    scored: int
    rejected: int


def score_pandas(
    wrapper: Any,
    sources: Sequence[Source],
    output: Sink,
    rejects: Sink,
    *,
    chunk_rows: int,
    run_id: str,
) -> Counts:
    """Score every row of ``sources`` with ``wrapper`` (a loaded ``MlopsModel``), chunk by chunk.

    Rows the contract refuses go to ``rejects`` with their reason; the rest, with the answer
    and ``run_id``, to ``output``.
    """
    contract = wrapper.contract
    answer = Answer(wrapper, run_id)
    scored = rejected = 0
    for source in sources:
        checked_columns = False
        for chunk in read_chunks(source, chunk_rows, text_columns=contract.categorical):
            if not checked_columns:
                check_columns(contract, chunk.frame.columns, f"input {source.uri!r}")
                checked_columns = True
            frame = from_text(contract, chunk.frame) if source.format == CSV else chunk.frame
            checked = split_rows(contract, frame)
            if len(checked.rejects):
                rejects.write(checked.rejects)
                rejected += len(checked.rejects)
            if checked.arrays is not None:
                output.write(answer.table(checked, chunk.table))
                scored += len(checked.good)
    return Counts(scored, rejected)


class Answer:
    """Output tables: the accepted rows as read, then the wrapper's answer and the run id."""

    def __init__(self, wrapper: Any, run_id: str) -> None:
        self.wrapper = wrapper
        self.fields = answer_fields(wrapper)
        self.names = {name for name, _ in self.fields}
        # the same text in every row: one column, made for the first chunk and sliced after
        self.texts = {
            NAME_COLUMN: wrapper.model_name,
            VERSION_COLUMN: wrapper.model_version,
            RUN_ID_COLUMN: run_id,
        }
        self.constants: dict[str, pa.Array] = {}

    def constant(self, name: str, n: int) -> pa.Array:
        """``n`` rows of the column ``name`` whose every row is the same text."""
        column = self.constants.get(name)
        if column is None or len(column) < n:
            column = self.constants[name] = pa.array([self.texts[name]] * n, pa.string())
        return column.slice(0, n)

    def table(self, checked: Checked, read: pa.Table | None) -> pa.Table:
        """The accepted rows of a chunk (``read``: the chunk as Arrow, where it was read so)
        and their answer."""
        assert checked.arrays is not None  # only called for a chunk with accepted rows
        if read is not None:  # Parquet: the rows as read, untouched
            if checked.reasons:
                keep = np.ones(read.num_rows, dtype=bool)
                keep[list(checked.reasons)] = False
                read = read.filter(pa.array(keep))
            base = read
        else:  # CSV: the model's columns as the contract read them, one type in every chunk
            numeric, categorical = checked.arrays
            frame = checked.good.copy()
            for j, col in enumerate(self.wrapper.contract.numeric):
                frame[col] = numeric[:, j]
            for j, col in enumerate(self.wrapper.contract.categorical):
                assert categorical is not None
                frame[col] = pd.array(categorical[:, j], dtype=object)
            base = pa.Table.from_pandas(frame, preserve_index=False)
        base = base.drop_columns([c for c in base.column_names if c in self.names])
        arrays = checked.arrays
        result = self.wrapper.answer(lambda: arrays)
        n = base.num_rows
        for name, kind in self.fields:
            values = (
                self.constant(name, n) if name in self.texts else pa.array(result[name], type=kind)
            )
            base = base.append_column(pa.field(name, kind), values)
        return base
