"""The ``pandas`` engine: one process streams the input piece by piece.

``scoring.chunk_rows`` bounds the rows held at once. The engine works on pieces of a quarter of
that: while one piece is checked by the model's input contract and scored by the loaded
wrapper, the next is read and the last one's answer is written by one I/O thread (Arrow
decodes and encodes Parquet without holding the GIL), so reading and writing overlap the
scoring and at most three pieces are in memory, whatever the size of the input. Each
piece is one row group of a Parquet output.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mlops.scoring.rows import (
    RUN_ID_COLUMN,
    Checked,
    check_columns,
    check_rows,
)
from mlops.scoring.sinks import Sink, answer_fields
from mlops.scoring.sources import CSV, Chunk, Source, read_chunks
from mlops.serving.wrapper import CLASS_KEY, NAME_COLUMN, PREDICTION_COLUMN, VERSION_COLUMN


@dataclass(frozen=True)
class Counts:
    """Rows an engine scored and rows it set aside."""

    scored: int
    rejected: int


def piece_rows(chunk_rows: int) -> int:
    """Rows per piece: a quarter of ``chunk_rows``, so the three pieces in flight (one read
    ahead, one scored, one being written) hold at most three quarters of it. Measured on
    1,000,000 rows (``benchmarks/batch.py``), thirds left the process's peak several
    megabytes higher than quarters; smaller pieces cost speed for no memory."""
    return max(1, chunk_rows // PIECES_PER_CHUNK)


PIECES_PER_CHUNK = 4


def score_pandas(
    wrapper: Any,
    sources: Sequence[Source],
    output: Sink,
    rejects: Sink,
    *,
    chunk_rows: int,
    run_id: str,
) -> Counts:
    """Score every row of ``sources`` with ``wrapper`` (a loaded ``MlopsModel``), piece by piece.

    Rows the contract refuses go to ``rejects`` with their reason; the rest, with the answer
    and ``run_id``, to ``output``, in the order read.
    """
    contract = wrapper.contract
    rules = rejecting_rules(wrapper)
    answer = Answer(wrapper, run_id)
    scored = rejected = 0
    rows = piece_rows(chunk_rows)
    io = _io_thread()
    written: Future[None] | None = None
    try:
        for source in sources:
            with closing(_read_ahead(io, source, rows, contract)) as pieces:
                for chunk in pieces:
                    checked = check_rows(contract, rules, chunk.frame, text=source.format == CSV)
                    if len(checked.rejects):
                        rejects.write(checked.rejects)
                        rejected += len(checked.rejects)
                    if checked.arrays is None:
                        continue
                    table = answer.table(checked, chunk.table)
                    scored += len(checked.good)
                    if written is not None:
                        written.result()  # the last piece is out (or its error is raised here)
                    written = io.submit(output.write, table)
        if written is not None:
            written.result()
    finally:
        if written is not None:
            wait([written])  # nothing may write to the sink after the caller discards it
    return Counts(scored, rejected)


_IO: ThreadPoolExecutor | None = None
_IO_LOCK = threading.Lock()


def rejecting_rules(wrapper: Any) -> Any:
    """The model's data rules where a row breaking one is refused (``on_rule_violation:
    reject``); None where there are none or they only flag rows (the answer says which)."""
    return None if wrapper.rules is None or wrapper.flag_violations else wrapper.rules


def _io_thread() -> ThreadPoolExecutor:
    """The one thread that reads and writes pieces for every job of this process.

    It is kept, not made per job: a new thread gets new allocator heaps, which hold megabytes
    of resident memory beside the last job's until those are reclaimed; one thread's heaps are
    reused piece after piece and job after job.
    """
    global _IO
    with _IO_LOCK:
        if _IO is None:
            _IO = ThreadPoolExecutor(1, thread_name_prefix="mlops-score-io")
        return _IO


def _read_ahead(
    io: ThreadPoolExecutor, source: Source, rows: int, contract: Any
) -> Generator[Chunk, None, None]:
    """``source``'s pieces, each next one read in ``io`` while the caller works on the last;
    its columns are checked on the first piece."""
    pieces = read_chunks(source, rows, text_columns=contract.categorical)
    upcoming: Future[Chunk | None] = io.submit(next, pieces, None)
    try:
        first = True
        while (chunk := upcoming.result()) is not None:
            upcoming = io.submit(next, pieces, None)
            if first:
                check_columns(contract, chunk.columns, f"input {source.uri!r}")
                first = False
            yield chunk
    finally:
        wait([upcoming])  # a read under way ends before its file is closed
        pieces.close()


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
        # a classifier's labels as Arrow, taken by each row's class index
        kind = dict(self.fields).get(PREDICTION_COLUMN)
        self.labels = (
            pa.array(list(wrapper.classes), type=kind)
            if wrapper.task == "classification" and wrapper.classes is not None
            else None
        )

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
            values: pa.Array
            if name in self.texts:
                values = self.constant(name, n)
            elif name == PREDICTION_COLUMN and self.labels is not None and CLASS_KEY in result:
                values = self.labels.take(pa.array(result[CLASS_KEY]))
            else:
                values = pa.array(result[name], type=kind)
            base = base.append_column(pa.field(name, kind), values)
        return base
