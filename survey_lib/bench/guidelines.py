"""A reporting checklist generated from a benchmark's results: each line says what to report or which figure
to trust, the evidence in these results, and the runs (store keys) that support it.

Nothing here is a fixed conclusion: a line whose evidence is absent says so with the data (for example "no
ranking flips between these targets"), so the checklist changes with the sweep that produced it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .._validate import check_type
from .registry import REFERENCE
from .report import TARGET, hardware_flips, label, labels, latency_figure, summary, task_flips

MISMATCH = 1.5   # counted MAC reduction and measured speedup "disagree" beyond this factor
CITED = 3        # method points cited per line (the strongest evidence first)
CLOSE = 0.7      # a rank correlation at least this high counts as "follows"


def guidelines(table: pd.DataFrame, hardware: Sequence[str]) -> pd.DataFrame:
    """The checklist for one spec's runs table on ``hardware``: columns guideline, evidence, rows (run keys)."""
    check_type("table", table, pd.DataFrame, "a ResultsStore.table() of one spec's runs")
    summ = summary(table)
    lines = [_seeds(table, summ), _macs_vs_latency(table, summ), _bytes_vs_latency(table, summ),
             _hardware_flips(table, summ, tuple(hardware)), _tasks(table, summ), *_which_figure(table, summ, hardware)]
    return pd.DataFrame([ln for ln in lines if ln is not None], columns=["guideline", "evidence", "rows"])


def _keys(table: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
    """The run keys (first 10 characters) behind summary ``rows``, every seed."""
    keys = []
    for _, r in rows.iterrows():
        same = (table[TARGET] == r[TARGET].to_numpy()).all(axis=1) & (table["method"] == r["method"])
        same &= table["point"].isna() if _nan(r["point"]) else table["point"] == r["point"]
        keys += [k[:10] for k in table.loc[same, "key"]]
    return keys


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _name(r: pd.Series) -> str:
    return f"{label(r['method'], r['point'])} ({r['task']})"


def _line(guideline: str, evidence: str, table: pd.DataFrame, rows: pd.DataFrame, examined: pd.DataFrame) -> dict[str, Any]:
    """A checklist line citing the runs of ``rows``, or of the first ``examined`` rows where no row showed the
    effect (the evidence that it is absent)."""
    return {"guideline": guideline, "evidence": evidence, "rows": _keys(table, rows if len(rows) else examined.head(CITED))}


def _seeds(table: pd.DataFrame, summ: pd.DataFrame) -> dict[str, Any] | None:
    """Report several seeds and the paired change with its range: how many method points the spread hides."""
    methods = summ[summ["method"] != REFERENCE]
    unclear = methods[methods["verdict"] == "no measurable difference"]
    judged = methods[~methods["verdict"].str.startswith("no verdict")]
    base = summ[summ["method"] == REFERENCE]
    if base.empty:
        return None
    spread = ", ".join(f"{r['task']} on {r['dataset']} {r['metric_name']} {r['metric']:.3f} ± {r['metric_std']:.3f}"
                       for _, r in base.iterrows())
    evidence = (f"baseline over {int(base['seeds'].max())} seeds (mean ± std): {spread}; for {len(unclear)} of the "
                f"{len(judged)} method points with a verdict, the paired changes over the seeds do not all share one "
                f"strict sign (no measurable difference)")
    return _line("Report the baseline and every method over several seeds, as a change paired with the baseline of the "
                 "same seed, with its range; unless every seed's change has the same strict sign, call it no measurable "
                 "difference",
                 evidence, table, pd.concat([base, unclear.sort_values("delta").head(CITED)]), base)


def _speedup(summ: pd.DataFrame) -> pd.DataFrame:
    """Method points with a measured host latency: counted MAC reduction and measured speedup vs the baseline."""
    col = latency_figure("host")
    if col not in summ.columns:
        return summ.iloc[0:0].assign(mac_x=[], speed_x=[], bytes_x=[])
    base = summ[summ["method"] == REFERENCE].set_index(TARGET)
    s = summ[(summ["method"] != REFERENCE) & summ[col].notna()].copy()
    ref = base.reindex(pd.MultiIndex.from_frame(s[TARGET]))
    s["mac_x"] = ref["any.macs [counted]"].to_numpy() / s["any.macs [counted]"].to_numpy()
    s["bytes_x"] = ref["any.stored_bytes [measured]"].to_numpy() / s["any.stored_bytes [measured]"].to_numpy()
    s["speed_x"] = 1 / s[col]
    return s


def _macs_vs_latency(table: pd.DataFrame, summ: pd.DataFrame) -> dict[str, Any] | None:
    """Counted MACs against measured host latency."""
    s = _speedup(summ)
    if s.empty:
        return None
    s["gap"] = np.maximum(s["mac_x"] / s["speed_x"], s["speed_x"] / s["mac_x"])
    off = s[s["gap"] > MISMATCH].sort_values("gap", ascending=False)
    cases = "; ".join(f"{_name(r)}: {r['mac_x']:.1f}x fewer MACs, {r['speed_x']:.2f}x as fast" for _, r in off.head(CITED).iterrows())
    evidence = (f"{len(off)} of {len(s)} method points timed on the host disagree with their counted MAC reduction by "
                f"more than {MISMATCH}x" + (f", e.g. {cases}" if cases else ": MACs were a fair proxy for this host here"))
    return _line("Report latency measured on the target (median and spread, interleaved with the baseline) beside "
                 "counted MACs; never a MAC reduction alone as a speedup", evidence, table, off.head(CITED), s)


def _bytes_vs_latency(table: pd.DataFrame, summ: pd.DataFrame) -> dict[str, Any] | None:
    """Stored bytes against measured host latency."""
    s = _speedup(summ)
    if s.empty:
        return None
    small = s[s["bytes_x"] >= 2]
    slow = small[small["speed_x"] <= 1.1].sort_values("bytes_x", ascending=False)
    cases = "; ".join(f"{_name(r)}: {r['bytes_x']:.1f}x smaller file, {r['speed_x']:.2f}x as fast" for _, r in slow.head(CITED).iterrows())
    evidence = (f"{len(slow)} of {len(small)} method points that shrank the stored file at least 2x ran no more than "
                f"1.1x as fast on the host" + (f", e.g. {cases}" if cases else ""))
    return _line("Report stored bytes as a size figure only: a smaller file is not a faster model unless the runtime "
                 "has kernels for its format", evidence, table, slow.head(CITED), small if len(small) else s)


def _hardware_flips(table: pd.DataFrame, summ: pd.DataFrame, hardware: tuple[str, ...]) -> dict[str, Any] | None:
    """Rankings that reverse between hardware targets."""
    present = tuple(h for h in hardware if latency_figure(h) in summ.columns)
    if len(present) < 2:
        return None   # nothing to compare
    flips = hardware_flips(summ, present)
    pairs = flips.groupby(["first_hw", "second_hw"]).size()
    examples = flips.drop_duplicates(["first_hw", "second_hw"]).head(CITED)
    by_pair = ", ".join(f"{n} between {a} and {b}" for (a, b), n in pairs.items())
    with_host = int(((flips["first_hw"] == "host") | (flips["second_hw"] == "host")).sum())
    evidence = (f"{len(flips)} reversed pairs of method points over {len(pairs)} of "
                f"{len(present) * (len(present) - 1) // 2} pairs of targets"
                + (f" ({by_pair}; {with_host} of them set the measured host against an estimated target)" if len(flips) else "")
                + (": " + "; ".join(f"{r['faster_on_first']} beats {r['faster_on_second']} on {r['first_hw']}, loses on "
                                    f"{r['second_hw']} ({r['task']} on {r['dataset']})" for _, r in examples.iterrows())
                   if len(flips) else ": no ranking reversed between these targets in this sweep"))
    named = {(*e[TARGET], lab) for _, e in examples.iterrows() for lab in (e["faster_on_first"], e["faster_on_second"])}
    cited = summ[[(*r[TARGET], label(r["method"], r["point"])) in named for _, r in summ.iterrows()]]
    return _line("Rank methods on the hardware you deploy to, and say whether its figures are measured or estimated: "
                 "a ranking on one target does not carry to another", evidence, table, cited, summ[summ["method"] != REFERENCE])


def _tasks(table: pd.DataFrame, summ: pd.DataFrame) -> dict[str, Any] | None:
    """Verdicts and orders that change between tasks on the same data and architecture."""
    s = summ[(summ["method"] != REFERENCE) & ~summ["verdict"].str.startswith("no verdict")]
    s = s.assign(label=labels(s))
    multi = s.groupby(["dataset", "arch"])["task"].transform("nunique") > 1
    s = s[multi]
    if s.empty:
        return None   # no dataset with two tasks: nothing to compare
    verdicts = s.groupby(["dataset", "arch", "label"])["verdict"].transform("nunique")
    differ = s[verdicts > 1]
    flips = task_flips(summ)
    groups = list(differ.groupby(["dataset", "arch", "label"], sort=False))
    cases = "; ".join(f"{lab} on {ds}: " + ", ".join(f"{r['task']} {r['verdict']}" for _, r in g.iterrows())
                      for (ds, _, lab), g in groups[:CITED])
    points = s.groupby(["dataset", "arch", "label"]).ngroups
    evidence = (f"{len(groups)} of {points} method points get a different verdict on another task of the same data"
                + (f" ({cases})" if cases else "") + f"; {len(flips)} pairs of method points swap order between tasks "
                "beyond the seeds' range")
    cited = pd.concat([g for _, g in groups[:CITED]]) if groups else s.iloc[0:0]
    return _line("Evaluate every task the model is deployed for, not classification alone: a method's cost to the "
                 "task metric depends on the task", evidence, table, cited, s)


def _mean_finite(values: list[float]) -> float:
    """The mean of the finite values (NaN if none: a figure constant within every target has no correlation)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _short(column: str) -> str:
    """``any.memory_traffic_bytes [counted]`` -> ``memory traffic``."""
    return {"macs": "MACs", "memory_traffic_bytes": "memory traffic", "stored_bytes": "stored bytes"}.get(
        column.split(".")[1].split(" ")[0], column)


def _which_figure(table: pd.DataFrame, summ: pd.DataFrame, hardware: Sequence[str]) -> list[dict[str, Any]]:
    """Per hardware target, the counted figure its latency follows (Spearman rank correlation over method points)."""
    figures = ["any.macs [counted]", "any.memory_traffic_bytes [counted]", "any.stored_bytes [measured]"]
    lines = []
    for hw in hardware:
        col = "host.latency_median_ms [measured]" if hw == "host" else latency_figure(hw)
        rows = table[table[col].notna()] if col in table.columns else table.iloc[0:0]
        # within a target (task sizes would dominate across targets), and only where at least 3 method points run
        groups = [g for _, g in rows.groupby(TARGET) if g.groupby(["method", "point"], dropna=False).ngroups >= 3]
        rho = {f: _mean_finite([g[col].rank().corr(g[f].rank()) for g in groups]) for f in figures if f in rows.columns}
        if not groups or all(math.isnan(r) for r in rho.values()):
            continue
        best = max(rho, key=lambda f: -math.inf if math.isnan(rho[f]) else rho[f])
        strongest = max(rho, key=lambda f: -math.inf if math.isnan(rho[f]) else abs(rho[f]))
        kind = "measured" if hw == "host" else "estimated"
        evidence = (f"{kind} latency on {hw} over {sum(map(len, groups))} runs, Spearman correlation within each of {len(groups)} "
                    f"targets, averaged: "
                    + ", ".join(f"{_short(f)} " + ("undefined (constant)" if math.isnan(r) else f"{r:+.2f}") for f, r in rho.items()))
        roofline = (" (an estimate is a roofline of MACs and bytes moved: this says which of the two bounds it)"
                    if hw != "host" and best != "any.stored_bytes [measured]" else "")
        compared = "MACs [counted], memory traffic [counted] and stored bytes [measured]"
        text = (f"On {hw}, {kind} latency follows {_short(best)} most closely of {compared}: report that figure for it{roofline}"
                if rho[best] >= CLOSE else
                f"On {hw}, {kind} latency follows none of {compared} closely (strongest: {_short(strongest)}, "
                f"{rho[strongest]:+.2f}): "
                f"report latency {kind} there, never one of these as its proxy")
        lines.append({"guideline": text,
                      "evidence": evidence, "rows": [k[:10] for k in groups[0].sort_values(col)["key"].iloc[[0, -1]]]})
    return lines


def checklist_markdown(lines: pd.DataFrame) -> str:
    """The checklist as Markdown: one box per guideline, its evidence and the runs it cites."""
    check_type("lines", lines, pd.DataFrame, "a guidelines() table")
    return "\n".join(f"- [ ] **{r['guideline']}.** {r['evidence']}. Runs: {', '.join(f'`{k}`' for k in r['rows'])}"
                     for _, r in lines.iterrows())
