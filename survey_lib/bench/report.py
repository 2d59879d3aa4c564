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
from .registry import FAMILIES, REFERENCE

PRIMARY = {"classification": "accuracy", "regression": "r2", "detection": "map50", "segmentation": "miou"}
TARGET = ["task", "dataset", "arch"]
GROUP = TARGET + ["family", "method", "point"]


def _primary(table: pd.DataFrame) -> pd.Series:
    return pd.Series([row[f"metric.{PRIMARY[row['task']]}"] for _, row in table.iterrows()], index=table.index, dtype=float)


MIN_SEEDS = 3   # a verdict needs at least this many seeds


def verdict(low: float, high: float, seeds: int) -> str:
    """The verdict on a paired change over ``seeds`` seeds (those with a baseline)."""
    if seeds < MIN_SEEDS:
        return f"no verdict ({seeds} seed{'s' * (seeds != 1)} paired with a baseline; needs {MIN_SEEDS})"
    if low > 0:
        return "better at every seed"
    if high < 0:
        return "worse at every seed"
    return "no measurable difference"


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per target x method x operating point (sorted by them): seeds, the primary metric's mean and std, its paired
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
    g = t.groupby(GROUP, sort=True)   # targets, methods and points in one order, whatever the run keys
    out = g.agg(seeds=("seed", "nunique"), paired=("delta", "count"), metric=("primary", "mean"), metric_std=("primary", "std"),
                delta=("delta", "mean"), delta_low=("delta", "min"), delta_high=("delta", "max"))
    out = out.join(g[costs].mean()).reset_index()
    out["metric_name"] = out["task"].map(PRIMARY)
    out["verdict"] = [verdict(lo, hi, n) if m != REFERENCE else "" for m, lo, hi, n in
                      zip(out["method"], out["delta_low"], out["delta_high"], out["paired"])]
    out["point"] = out["point"].where(out["point"] >= 0)
    return out


MAX_DROP = 0.02   # a ranking keeps method points whose mean change in the primary metric is no worse than this


def latency_figure(hardware: str) -> str:
    """The latency column a ranking uses on ``hardware``: measured (ratio to the baseline) on the host,
    estimated elsewhere."""
    return "host.latency_ratio [measured]" if hardware == "host" else f"{hardware}.est_latency_s [estimated]"


def ranking(summ: pd.DataFrame, hardware: str, figure: str | None = None, max_drop: float = MAX_DROP) -> pd.DataFrame:
    """Per target, the method points that lose at most ``max_drop`` of the primary metric (mean over seeds)
    and run on ``hardware``, ranked by a cost there (lower is better): :func:`latency_figure` unless
    ``figure`` names another column."""
    from .._validate import check_float

    max_drop = check_float("max_drop", max_drop, min_value=0.0)
    column = figure or latency_figure(hardware)
    if column not in summ.columns:
        raise ValueError(f"figure {column!r} is not in the store; available: {sorted(c for c in summ.columns if '[' in c)}")
    kept = summ[(summ["delta"] >= -max_drop) & summ[column].notna()].copy()
    kept["rank"] = kept.groupby(TARGET)[column].rank(method="min").astype(int)
    kept["hardware"], kept["figure"] = hardware, column
    return kept.sort_values(TARGET + ["rank"])[TARGET + ["hardware", "rank", "method", "point", column, "delta", "verdict"]]


def label(method: str, point: float | None) -> str:
    """A method point's short name: ``ptq@8``, or the method alone where it has one setting."""
    return method if point is None or (isinstance(point, float) and math.isnan(point)) else f"{method}@{point:g}"


def labels(frame: pd.DataFrame) -> list[str]:
    """:func:`label` of every row of ``frame`` (its method and point columns)."""
    return [label(m, p) for m, p in zip(frame["method"], frame["point"])]


def pareto(summ: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Per target, every method point with the primary metric (mean, std) against ``cost`` (a column, lower is
    better) and ``on_front``: no other point of the target is at least as good on both and better on one."""
    if cost not in summ.columns:
        raise ValueError(f"cost {cost!r} is not in the store; available: {sorted(c for c in summ.columns if '[' in c)}")
    rows = summ[summ[cost].notna() & summ["metric"].notna()].copy()
    rows["cost"], rows["label"] = rows[cost], labels(rows)
    fronts = []
    for _, group in rows.groupby(TARGET, sort=False):
        m, c = group["metric"].to_numpy(), group["cost"].to_numpy()
        dominated = [bool(((m >= m[i]) & (c <= c[i]) & ((m > m[i]) | (c < c[i]))).any()) for i in range(len(group))]
        fronts.append(group.assign(on_front=np.logical_not(dominated)))
    columns = TARGET + ["label", "method", "point", "metric_name", "metric", "metric_std", "delta", "cost", "on_front"]
    return pd.concat(fronts)[columns].sort_values(TARGET + ["cost"]).reset_index(drop=True) if fronts else pd.DataFrame(columns=columns)


def _clearly_lower(a: float, b: float, margin: float) -> bool:
    return a * (1 + margin) < b


def hardware_flips(summ: pd.DataFrame, hardware: tuple[str, ...], max_drop: float = MAX_DROP, margin: float = 0.1) -> pd.DataFrame:
    """Pairs of method points whose latency order reverses between two hardware targets, per target: on
    ``first_hw`` one is faster by more than ``margin`` (relative), on ``second_hw`` the other is. Only method
    points that a :func:`ranking` keeps (at most ``max_drop`` lost) and that run on both targets count."""
    ranked = {hw: ranking(summ, hw, max_drop=max_drop).rename(columns={latency_figure(hw): "latency"})
              .assign(label=labels)[TARGET + ["label", "latency"]]
              for hw in hardware}
    rows = []
    f1, f2 = "latency_1", "latency_2"
    for i, h1 in enumerate(hardware):
        for h2 in hardware[i + 1:]:
            both = ranked[h1].merge(ranked[h2], on=TARGET + ["label"], suffixes=("_1", "_2"))
            for target, group in both.groupby(TARGET, sort=False):
                g = group.to_dict("records")
                for a in g:
                    for b in g:
                        if _clearly_lower(a[f1], b[f1], margin) and _clearly_lower(b[f2], a[f2], margin):
                            rows.append(dict(zip(TARGET, target), first_hw=h1, second_hw=h2, faster_on_first=a["label"],
                                             faster_on_second=b["label"], first_figures=(a[f1], b[f1]),
                                             second_figures=(b[f2], a[f2])))
    return pd.DataFrame(rows, columns=TARGET + ["first_hw", "second_hw", "faster_on_first", "faster_on_second",
                                                "first_figures", "second_figures"])


def task_flips(summ: pd.DataFrame) -> pd.DataFrame:
    """Pairs of method points whose order by change in the primary metric reverses between two tasks of one
    dataset and architecture: on one task one is better at every seed's range (its lowest change above the
    other's highest), on the other task the other is. Only method points paired at MIN_SEEDS seeds or more count."""
    s = summ[(summ["method"] != REFERENCE) & (summ["paired"] >= MIN_SEEDS)]
    s = s.assign(label=labels(s))
    rows = []
    for (dataset, arch), group in s.groupby(["dataset", "arch"], sort=False):
        tasks = list(dict.fromkeys(group["task"]))
        by_task = {t: group[group["task"] == t].set_index("label") for t in tasks}
        for i, t1 in enumerate(tasks):
            for t2 in tasks[i + 1:]:
                common = by_task[t1].index.intersection(by_task[t2].index)
                for a in common:
                    for b in common:
                        x, y = by_task[t1], by_task[t2]
                        if x.loc[a, "delta_low"] > x.loc[b, "delta_high"] and y.loc[b, "delta_low"] > y.loc[a, "delta_high"]:
                            rows.append({"dataset": dataset, "arch": arch, "first_task": t1, "second_task": t2,
                                         "better_on_first": a, "better_on_second": b,
                                         "first_deltas": (x.loc[a, "delta"], x.loc[b, "delta"]),
                                         "second_deltas": (y.loc[b, "delta"], y.loc[a, "delta"])})
    return pd.DataFrame(rows, columns=["dataset", "arch", "first_task", "second_task", "better_on_first", "better_on_second",
                                       "first_deltas", "second_deltas"])


def leaderboard(summ: pd.DataFrame, hardware: tuple[str, ...] = ()) -> str:
    """A Markdown leaderboard: one table per target, methods by family, with the metric change and costs."""
    lines = []
    order = {f: i for i, f in enumerate(FAMILIES)}
    for target, rows in summ.groupby(TARGET, sort=False):
        rows = rows.assign(_f=rows["family"].map(order), _p=rows["point"].fillna(0)).sort_values(["_f", "method", "_p"])
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
