"""Reading a results store: per-method summaries over seeds, rankings per hardware target, a leaderboard.

Every figure keeps its kind in its column name (``HARDWARE.NAME [kind]``). A method's change in the task's
primary metric is taken against the baseline of the same target and seed (a paired difference), and called
better or worse only when every seed agrees; otherwise it is "no measurable difference" at this number of
seeds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .._validate import check_type
from .registry import REFERENCE

PRIMARY = {"classification": "accuracy", "regression": "r2", "detection": "map50", "segmentation": "miou"}
TARGET = ["task", "dataset", "arch"]
GROUP = TARGET + ["family", "method", "point"]


def _primary(table: pd.DataFrame) -> pd.Series:
    return pd.Series([row[f"metric.{PRIMARY[row['task']]}"] for _, row in table.iterrows()], index=table.index, dtype=float)


MIN_SEEDS = 3   # a verdict needs at least this many seeds


def _verdict(low: float, high: float, seeds: int) -> str:
    """The verdict on a paired change over ``seeds`` seeds (those with a baseline)."""
    if seeds < MIN_SEEDS:
        return f"no verdict ({seeds} seed{'s' * (seeds != 1)} paired with a baseline; needs {MIN_SEEDS})"
    if low > 0:
        return "better at every seed"
    if high < 0:
        return "worse at every seed"
    return "no measurable difference"


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per target x method x operating point: seeds, the primary metric's mean and std, its paired
    change against the baseline (mean, range over seeds, verdict) and the mean of every cost column."""
    check_type("table", table, pd.DataFrame, "a ResultsStore.table()")
    t = table.copy()
    t["primary"] = _primary(t)
    base = t[t["method"] == REFERENCE].set_index(TARGET + ["seed"])["primary"]
    if base.index.duplicated().any():
        raise ValueError("table holds more than one baseline run per target and seed (runs of several specs or code "
                         "versions); pass the runs of one spec: store.table(keys=[r.key for r in spec.runs()])")
    t["delta"] = t["primary"].to_numpy() - base.reindex(pd.MultiIndex.from_frame(t[TARGET + ["seed"]])).to_numpy()
    t["point"] = t["point"].fillna(-1.0)   # one setting: grouped, shown as "-"
    costs = [c for c in t.columns if c.endswith("]") and "[" in c]
    g = t.groupby(GROUP, sort=False)
    out = g.agg(seeds=("seed", "nunique"), paired=("delta", "count"), metric=("primary", "mean"), metric_std=("primary", "std"),
                delta=("delta", "mean"), delta_low=("delta", "min"), delta_high=("delta", "max"))
    out = out.join(g[costs].mean()).reset_index()
    out["metric_name"] = out["task"].map(PRIMARY)
    out["verdict"] = [_verdict(lo, hi, n) if m != REFERENCE else "" for m, lo, hi, n in
                      zip(out["method"], out["delta_low"], out["delta_high"], out["paired"])]
    out["point"] = out["point"].where(out["point"] >= 0)
    return out


def ranking(summ: pd.DataFrame, hardware: str, figure: str | None = None) -> pd.DataFrame:
    """Per target, the methods that are not worse at every seed, ranked by a cost on ``hardware`` (lower is
    better): measured latency ratio on the host, estimated latency elsewhere, unless ``figure`` names one."""
    column = figure or ("host.latency_ratio [measured]" if hardware == "host" else f"{hardware}.est_latency_s [estimated]")
    if column not in summ.columns:
        raise ValueError(f"figure {column!r} is not in the store; available: {sorted(c for c in summ.columns if '[' in c)}")
    kept = summ[(summ["verdict"] != "worse at every seed") & summ[column].notna()].copy()
    kept["rank"] = kept.groupby(TARGET)[column].rank(method="min").astype(int)
    kept["hardware"], kept["figure"] = hardware, column
    return kept.sort_values(TARGET + ["rank"])[TARGET + ["hardware", "rank", "method", "point", column, "delta", "verdict"]]


def leaderboard(summ: pd.DataFrame, hardware: tuple[str, ...] = ()) -> str:
    """A Markdown leaderboard: one table per target, methods by family, with the metric change and costs."""
    lines = []
    for target, rows in summ.groupby(TARGET, sort=False):
        lines += [f"### {target[0]} on {target[1]} ({target[2]}), {rows['metric_name'].iloc[0]}", ""]
        cols = {"family": "family", "method": "method", "point": "point", "seeds": "seeds", "metric": "metric (mean)",
                "delta": "change vs baseline (mean)", "range": "change range over seeds", "verdict": "verdict",
                "any.params [counted]": "params [counted]", "any.stored_bytes [measured]": "stored bytes [measured]",
                "host.latency_ratio [measured]": "latency / baseline, host [measured]"}
        cols.update({f"{hw}.est_latency_s [estimated]": f"latency s, {hw} [estimated]" for hw in hardware if hw != "host"})
        view = rows.assign(range=[f"{lo:+.3f} to {hi:+.3f}" for lo, hi in zip(rows["delta_low"], rows["delta_high"])],
                           delta=[f"{d:+.3f}" for d in rows["delta"]],
                           point=["-" if math.isnan(p) else f"{p:g}" for p in rows["point"]])
        lines += [_markdown(view[[c for c in cols if c in view.columns]].rename(columns=cols)), ""]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"
    return str(v)


def _markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])
