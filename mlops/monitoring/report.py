"""The drift report of a monitoring check: PNG plots and one HTML page that shows them."""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from mlops.monitoring import drift
from mlops.monitoring.compare import PREFIX as COMPARE_PREFIX
from mlops.monitoring.compare import table as comparison_table
from mlops.monitoring.drift import metric_key
from mlops.monitoring.store import CheckResult

MAX_FEATURE_PLOTS = 6  # the most drifted features get a histogram each


def write_report(
    folder: Path,
    result: CheckResult,
    profile: dict[str, Any],
    features: pd.DataFrame,
    ok: pd.DataFrame,
) -> list[Path]:
    """Write ``report.html`` and its PNGs into ``folder``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.metrics
    files: list[Path] = []
    rows = []
    for col, ref in profile["features"].items():
        key = metric_key(col)
        rows.append(
            (col, ref["kind"], m.get(f"psi/{key}"), m.get(f"ks/{key}"), m.get(f"ks_pvalue/{key}"))
        )
    computed = [(col, kind, psi, ks, p) for col, kind, psi, ks, p in rows if psi is not None]
    images: list[tuple[str, str]] = []
    if computed:
        ordered = sorted(computed, key=lambda r: r[2], reverse=True)
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(ordered))))
        ax.barh([r[0] for r in ordered][::-1], [r[2] for r in ordered][::-1], color="tab:blue")
        ax.axvline(0.2, color="tab:red", linestyle="--", label="0.2: significant shift")
        ax.axvline(0.1, color="tab:orange", linestyle=":", label="0.1: moderate shift")
        ax.set_xlabel("PSI against the training data")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        images.append(("PSI per feature", _save(fig, folder / "psi.png", files)))
        plt.close(fig)
        for col, *_ in ordered[:MAX_FEATURE_PLOTS]:
            labels, ref_shares, cur_shares = drift.shares_for_plot(
                profile["features"][col], features[col].tolist()
            )
            images.append(
                (
                    f"{col}: PSI {m.get(f'psi/{metric_key(col)}', float('nan')):.3f}",
                    _bars(
                        plt,
                        labels,
                        ref_shares,
                        cur_shares,
                        col,
                        folder / f"feature_{_safe(col)}.png",
                        files,
                    ),
                )
            )
        labels, ref_shares, cur_shares = drift.shares_for_plot(
            profile["prediction"], ok["prediction"].tolist()
        )
        images.append(
            (
                f"predictions: PSI {m.get('prediction_psi', float('nan')):.3f}",
                _bars(
                    plt,
                    labels,
                    ref_shares,
                    cur_shares,
                    "prediction",
                    folder / "predictions.png",
                    files,
                ),
            )
        )

    when = datetime.fromtimestamp(result.at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    drifted = set(result.drifted)
    table = "".join(
        f"<tr{' class=drift' if col in drifted else ''}><td>{html.escape(col)}</td><td>{kind}</td>"
        f"<td>{_fmt(psi)}</td><td>{_fmt(ks)}</td><td>{_fmt(p)}</td></tr>"
        for col, kind, psi, ks, p in rows
    )
    summary = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
        for k, v in sorted(m.items())
        if not k.startswith(("psi/", "ks/", "ks_pvalue/", f"{COMPARE_PREFIX}/"))
    )
    compared = comparison_table(m)
    comparison = (
        "<h2>Comparison of the arms (a split or shadow in this window)</h2><pre>"
        + html.escape("\n".join(compared))
        + "</pre>"
        if compared
        else ""
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) or "<li>none</li>"
    alerts = (
        "".join(
            f"<li>{html.escape(a.message)}{html.escape(f' ({a.action})') if a.action else ''}</li>"
            for a in result.alerts
        )
        or "<li>none</li>"
    )
    pictures = "".join(
        f"<figure><img src='{src}' alt='{html.escape(title)}'><figcaption>{html.escape(title)}"
        f"</figcaption></figure>"
        for title, src in images
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8">\
<title>Drift report: {html.escape(result.model)} v{result.version}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child{{text-align:left}}
tr.drift{{background:#fdd}} figure{{display:inline-block;margin:1em}} \
img{{max-width:560px}}</style></head>
<body><h1>{html.escape(result.model)} version {result.version}</h1>
<p>Check at {when} over the last {result.window_s:g} s: status <b>{result.status}</b>,
{int(m.get("requests", 0))} requests, {int(m.get("predictions", 0))} predictions,
{int(m.get("labelled", 0))} labelled.</p>
<h2>Alerts</h2><ul>{alerts}</ul>
<h2>Notes</h2><ul>{notes}</ul>
<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>{summary}</table>
{comparison}
<h2>Feature drift</h2><table><tr><th>feature</th><th>kind</th><th>PSI</th>\
<th>KS</th><th>KS p-value</th></tr>{table}</table>
<h2>Distributions: training data vs. this window</h2>{pictures or "<p>not computed</p>"}
</body></html>
"""
    page_path = folder / "report.html"
    page_path.write_text(page)
    files.append(page_path)
    return files


def _bars(
    plt: Any,
    labels: list[str],
    ref: list[float],
    cur: list[float],
    title: str,
    path: Path,
    files: list[Path],
) -> str:
    import numpy as np

    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(x - 0.2, ref, width=0.4, label="training (reference)", color="tab:gray")
    ax.bar(x + 0.2, cur, width=0.4, label="served (this window)", color="tab:blue")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share of rows")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = _save(fig, path, files)
    plt.close(fig)
    return name


def _save(fig: Any, path: Path, files: list[Path]) -> str:
    fig.savefig(path, dpi=80)
    files.append(path)
    return path.name


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:80]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{int(value):,}" if value.is_integer() and abs(value) >= 1 else f"{value:.4g}"
    return html.escape(str(value))
