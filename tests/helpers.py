"""Small shared helpers for tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def make_csv(path: Path, n: int = 120, seed: int = 0, **extra_columns: object) -> Path:
    """A small binary-classification CSV with two numeric features and a categorical one."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    x2 = rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    label = np.where(x1 + 0.5 * x2 + (color == "red") > 0.3, "yes", "no")
    frame = pd.DataFrame({"x1": x1, "x2": x2, "color": color, "label": label})
    for name, values in extra_columns.items():
        frame[name] = values
    frame.to_csv(path, index=False)
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``mlops ARGS`` in-process as the console script runs it: (exit code, stdout, stderr)."""
    from mlops.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
