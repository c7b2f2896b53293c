"""The comparison's report: Table 2 and the ablation tables as Markdown and CSV, matplotlib
figures, and a "what this shows" paragraph per table generated from the numbers.

Values are test metrics: MRR@k for item tasks, accuracy for class tasks. Across seeds a cell is
``mean ± std`` (sample standard deviation); the CSVs add the count and a 95% confidence interval
of the mean (Student's t). ``*`` marks a value that is not above the popularity / majority floor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from conure_dist.compare import PRUNE_SWEEP, Outcome, outcome_rows
from conure_dist.train.plan import METHODS
from conure_dist.train.rundir import csv_text

LABELS = {"dnn": "DNN", "sinmo": "SinMo", "sinmoall": "SinMoAll", "finesmax": "FineSmax", "fineall": "FineAll",
          "peterrec": "PeterRec", "mtl": "MTL", "conure-": "Conure-", "conure": "Conure", "conure_ray": "Conure (Ray Train + DeepSpeed)"}
# Student's t, two-sided 95%, by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

    @property
    def ci95(self) -> float:
        return _T95.get(self.n - 1, 1.96) * self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    def text(self, floor: float | None = None) -> str:
        if not self.values:
            return "-"
        mark = "*" if floor is not None and self.mean <= floor else ""
        return f"{self.mean:.4f} ± {self.std:.4f}{mark}" if self.n > 1 else f"{self.mean:.4f}{mark}"


@dataclass
class ReportInputs:
    outcomes: list[Outcome]
    tasks: list[str]  # T1..Tn of the main order
    metrics: dict[str, str]  # task -> main metric
    floors: dict[str, float]  # task -> popularity / majority floor (test)
    test_rows: dict[str, int]  # task -> test rows
    settings: dict[str, Any]  # shown in the report: dataset, model, training, seeds, wall time
    tuning: list[dict]
    command: str
    floor_se: dict[str, float] = None  # task -> standard error of Pop's value from the test split's sampling
    validation_floors: dict[str, float] = None  # task -> Pop on the validation split


def _stat(outcomes: Iterable[Outcome], value) -> Stat:
    return Stat([v for o in outcomes if (v := value(o)) is not None])


def _by_variant(outcomes: Sequence[Outcome], variant: str, seeds_of: str | None = None) -> list[Outcome]:
    """The outcomes of ``variant``; with ``seeds_of``, only at the seeds that variant ran (an
    ablation runs fewer seeds than Table 2, and is compared at its own seeds)."""
    seeds = {o.seed for o in outcomes if o.variant == seeds_of} if seeds_of else None
    return [o for o in outcomes if o.variant == variant and (seeds is None or o.seed in seeds)]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- Table 2 ---------------------------------------------------------------------------------------

def table2(inp: ReportInputs) -> tuple[list[dict], str, str]:
    """(CSV rows, Markdown table, what it shows) of the methods x tasks comparison."""
    rows_csv, rows_md = [], []
    cols = inp.tasks
    rows_md.append(["Pop", *(f"{inp.floors[t]:.4f}" for t in cols), "0", "0"])
    for t in cols:
        rows_csv.append({"method": "Pop", "task": t, "metric": inp.metrics[t], "mean": inp.floors[t], "std": 0, "n": 1,
                         "ci95": "", "backbones": 0, "serving_mb": 0})
    order = [m for m in ("dnn", "sinmo", "sinmoall", "finesmax", "fineall", "peterrec", "mtl") if _by_variant(inp.outcomes, m)]
    lines: list[tuple[str, dict[str, Stat], Stat, Stat]] = []
    for m in order:
        outs = _by_variant(inp.outcomes, m)
        cells = {t: _stat(outs, lambda o, t=t: o.final(t, inp.metrics[t])) for t in cols}
        if m == "mtl":  # T1 is not a task of its own in MTL (paper: "-")
            cells[cols[0]] = Stat([])
        lines.append((m, cells, _stat(outs, lambda o: o.backbones), _stat(outs, lambda o: o.serving_bytes / 2**20)))
    conure = _by_variant(inp.outcomes, "conure")
    if conure:
        lines.append(("conure-", {t: _stat(conure, lambda o, t=t: o.before(t, inp.metrics[t])) for t in cols}, Stat([]), Stat([])))
        lines.append(("conure", {t: _stat(conure, lambda o, t=t: o.final(t, inp.metrics[t])) for t in cols},
                      _stat(conure, lambda o: o.backbones), _stat(conure, lambda o: o.serving_bytes / 2**20)))
    ray = _by_variant(inp.outcomes, "conure_ray")
    if ray:
        lines.append(("conure_ray", {t: _stat(ray, lambda o, t=t: o.final(t, inp.metrics[t])) for t in cols},
                      _stat(ray, lambda o: o.backbones), _stat(ray, lambda o: o.serving_bytes / 2**20)))
    for m, cells, b, mb in lines:
        rows_md.append([LABELS[m], *(cells[t].text(inp.floors[t]) for t in cols),
                        f"{b.mean:.0f}" if b.values else "-", f"{mb.mean:.1f}" if mb.values else "-"])
        for t in cols:
            s = cells[t]
            rows_csv.append({"method": LABELS[m], "task": t, "metric": inp.metrics[t], "mean": s.mean if s.values else "",
                             "std": s.std if s.n > 1 else "", "n": s.n, "ci95": s.ci95 if s.n > 1 else "",
                             "backbones": b.mean if b.values else "", "serving_mb": round(mb.mean, 3) if mb.values else ""})
    header = ["Method", *(f"T{i + 1} {t} ({inp.metrics[t]})" for i, t in enumerate(cols)), "#B", "MB to serve"]
    return rows_csv, _md_table(header, rows_md), _table2_text(inp, {m: c for m, c, _, _ in lines})


def _table2_text(inp: ReportInputs, cells: dict[str, dict[str, Stat]]) -> str:
    cols, out = inp.tasks, []
    below = [(LABELS[m], t, c[t].mean, inp.floors[t]) for m, c in cells.items() for t in cols
             if c[t].values and c[t].mean <= inp.floors[t]]
    se = inp.floor_se or {}
    if below:
        out.append("Not above the popularity / majority floor (mean over seeds; the gap in units of the test split's "
                   "sampling standard error): " + "; ".join(
                       f"{m} on {t} ({v:.4f} vs {f:.4f}" + (f", {(f - v) / se[t]:.1f} SE)" if se.get(t) else ")")
                       for m, t, v, f in below) + ".")
    else:
        out.append("Every method is above the popularity / majority floor on every task (mean over seeds).")
    forgetting = []
    for m in ("sinmoall", "conure"):
        outs = _by_variant(inp.outcomes, m)
        for t in cols[:-1]:
            drops = [(o.at_commit(t, inp.metrics[t]), o.final(t, inp.metrics[t])) for o in outs]
            drops = [(a, b) for a, b in drops if a is not None and b is not None]
            if drops:
                a, b = float(np.mean([d[0] for d in drops])), float(np.mean([d[1] for d in drops]))
                changed = max(abs(x - y) for x, y in drops)
                forgetting.append((m, t, a, b, changed))
    for m in ("sinmoall", "conure"):
        rows = [f for f in forgetting if f[0] == m]
        if rows:
            worst = max(rows, key=lambda f: f[2] - f[3])
            if max(f[4] for f in rows) == 0:
                out.append(f"{LABELS[m]} serves every earlier task exactly as at its commit after all {len(cols)} tasks "
                           f"(largest change of any earlier task's test value over seeds: 0).")
            else:
                out.append(f"{LABELS[m]}: after the last task, earlier tasks moved from their value at commit; the largest "
                           f"mean drop is on {worst[1]}: {worst[2]:.4f} at its commit, {worst[3]:.4f} at the end "
                           f"({100 * (worst[3] - worst[2]) / worst[2] if worst[2] else 0:+.0f}%).")
    if "conure" in cells:
        verdicts = []
        for rival in ("fineall", "peterrec"):
            if rival not in cells:
                continue
            counts = {"better": 0, "within seed noise": 0, "worse": 0}
            for t in cols[1:]:
                a, b = cells["conure"][t], cells[rival][t]
                if not a.values or not b.values:
                    continue
                # Two std of the seeds' spread; with a single seed, twice the test split's sampling
                # error instead (a lower bound: training noise is not in it).
                noise = (2 * math.sqrt(a.std ** 2 + b.std ** 2) if a.n > 1 and b.n > 1
                         else 2 * math.sqrt(2) * (inp.floor_se or {}).get(t, 0.0))
                d = a.mean - b.mean
                counts["within seed noise" if abs(d) <= noise else ("better" if d > 0 else "worse")] += 1
            verdicts.append(f"vs {LABELS[rival]}: " + ", ".join(f"{k} on {v}" for k, v in counts.items()))
        nb = {m: _stat(_by_variant(inp.outcomes, m), lambda o: o.backbones).mean for m in ("conure", "fineall")}
        out.append(f"Conure on T2..T{len(cols)} (a difference within twice the combined seed std counts as noise; "
                   "every method uses the learning rates tuned on FineAll's validation values): "
                   + "; ".join(verdicts) + f". Conure keeps {nb['conure']:.0f} backbone"
                   + (f", FineAll {nb['fineall']:.0f}." if not math.isnan(nb["fineall"]) else "."))
    return " ".join(out)


# -- ablations ---------------------------------------------------------------------------------------

def ablation_tables(inp: ReportInputs) -> list[tuple[str, list[dict], str, str]]:
    """(name, CSV rows, Markdown, what it shows) of Tables 3-6 and Figure 6's numbers."""
    out = []
    cols, metric = inp.tasks, inp.metrics
    if _by_variant(inp.outcomes, "conure_no_t2") and len(cols) >= 3:
        t3 = cols[2]
        pairs = [("with T2 first", "conure", "conure_no_t2", "80/5/15"), ("with T2 first", "conure_split20", "conure_no_t2_split20", "20/80")]
        rows, md = [], []
        for _, with_v, without_v, split in pairs:
            w = _stat(_by_variant(inp.outcomes, with_v, seeds_of=without_v), lambda o: o.before(t3, metric[t3]))
            wo = _stat(_by_variant(inp.outcomes, without_v), lambda o: o.before(t3, metric[t3]))
            if not w.values or not wo.values:
                continue
            gain = 100 * (w.mean - wo.mean) / wo.mean if wo.mean else math.nan
            rows.append({"split": split, "task": t3, "conure_no_t2": wo.mean, "conure": w.mean, "improvement_pct": gain})
            md.append([split, wo.text(), w.text(), f"{gain:+.1f}%"])
        text = " ".join(f"On the {r['split']} split, learning {cols[1]} before {t3} changes Conure-'s {t3} "
                        f"{metric[t3]} from {r['conure_no_t2']:.4f} to {r['conure']:.4f} ({r['improvement_pct']:+.1f}%)."
                        for r in rows)
        out.append((f"Table 3: {cols[1]} before {t3} (Conure-, {t3}'s test {metric[t3]})", rows,
                    _md_table(["train/val/test split", "Conure_noT2", "Conure", "Impro."], md), text))
    orders = [v for v in ("conure", "order2", "order3") if _by_variant(inp.outcomes, v)]
    if len(orders) > 1:
        rows, md = [], []
        for v in orders:
            o = _by_variant(inp.outcomes, v, seeds_of=orders[-1])
            seq = o[0].tasks
            cells = {t: (_stat(o, lambda x, t=t: x.before(t, metric[t])), _stat(o, lambda x, t=t: x.final(t, metric[t]))) for t in cols[1:] if t in seq}
            rows += [{"order": " -> ".join(seq), "task": t, "conure-": a.mean, "conure": b.mean} for t, (a, b) in cells.items()]
            md.append([" → ".join(seq), *(f"{cells[t][0].text()} / {cells[t][1].text()}" if t in cells else "-" for t in cols[1:])])
        spread = {t: max(r["conure"] for r in rows if r["task"] == t) - min(r["conure"] for r in rows if r["task"] == t)
                  for t in {r["task"] for r in rows}}
        text = ("Largest difference in Conure's value of a task between orders: "
                + ", ".join(f"{t} {spread[t]:.4f}" for t in cols[1:] if t in spread) + ".")
        out.append(("Table 4: task orders (Conure- / Conure, test)", rows,
                    _md_table(["order", *cols[1:]], md), text))
    sweep = [(r, _by_variant(inp.outcomes, f"prune_{r:g}")) for r in PRUNE_SWEEP]
    sweep = [(r, o) for r, o in sweep if o]
    if sweep and len(cols) >= 2:
        t2 = cols[1]
        base = _stat(_by_variant(inp.outcomes, "conure", seeds_of=f"prune_{sweep[0][0]:g}"),
                     lambda o: o.best_validation.get(f"{t2}/train"))
        rows, md = [], []
        for r, o in sweep:
            after = _stat(o, lambda x: x.final(t2, metric[t2]))
            best_val = _stat(o, lambda x: x.best_validation.get(f"{t2}/retrain"))
            owned = _stat(o, lambda x: x.capacity.get(t2))
            rows.append({"prune_ratio": r, "task": t2, "validation_before_pruning": base.mean, "validation_best_retrained": best_val.mean,
                         "test_after_retrain": after.mean, "owned_share": owned.mean})
            md.append([f"{r:g}", f"{owned.mean:.1%}", base.text(), best_val.text(), after.text()])
        text = " ".join(f"Pruning {r['prune_ratio']:.0%} of {t2}'s share and retraining reaches a best validation "
                        f"{metric[t2]} of {r['validation_best_retrained']:.4f} against {r['validation_before_pruning']:.4f} "
                        f"before pruning." for r in rows)
        out.append((f"Figure 6: prune ratio of {t2} (see retraining.png)", rows,
                    _md_table(["prune ratio", f"{t2} keeps", "val. before pruning", "best val. after retraining",
                               "test after retraining"], md), text))
    for variant, title in (("embedding_conure", "Table 5: the embedding pruned too"),):
        o = _by_variant(inp.outcomes, variant)
        if o:
            seq = o[0].tasks
            a = {t: _stat(o, lambda x, t=t: x.before(t, metric[t])) for t in seq}
            b = {t: _stat(o, lambda x, t=t: x.final(t, metric[t])) for t in seq}
            plain = {t: _stat(_by_variant(inp.outcomes, "conure", seeds_of=variant), lambda x, t=t: x.final(t, metric[t]))
                     for t in seq}
            rows = [{"model": "Conure- (embedding pruned)", "task": t, "value": a[t].mean} for t in seq]
            rows += [{"model": "Conure (embedding pruned)", "task": t, "value": b[t].mean} for t in seq]
            md = [["Conure- (embedding pruned)", *(a[t].text() for t in seq)], ["Conure (embedding pruned)", *(b[t].text() for t in seq)],
                  ["Conure (convolutions only, same seeds)", *(plain[t].text() for t in seq)]]
            text = "Pruning the embedding too, against pruning the convolutions only: " + ", ".join(
                f"{t} {b[t].mean:.4f} vs {plain[t].mean:.4f}" for t in seq) + "."
            out.append((title, rows, _md_table(["model", *seq], md), text))
    tc, tf = _by_variant(inp.outcomes, "transformer_conure"), _by_variant(inp.outcomes, "transformer_fineall")
    if tc and tf:
        seq = tc[0].tasks
        cells = {"FineAll": {t: _stat(tf, lambda x, t=t: x.final(t, metric[t])) for t in seq},
                 "Conure-": {t: _stat(tc, lambda x, t=t: x.before(t, metric[t])) for t in seq},
                 "Conure": {t: _stat(tc, lambda x, t=t: x.final(t, metric[t])) for t in seq}}
        nb = {"FineAll": _stat(tf, lambda x: x.backbones).mean, "Conure-": math.nan, "Conure": 1}
        rows = [{"model": m, "task": t, "value": c[t].mean, "backbones": nb[m]} for m, c in cells.items() for t in seq]
        md = [[m, *(c[t].text(inp.floors.get(t)) for t in seq), "-" if math.isnan(nb[m]) else f"{nb[m]:.0f}"] for m, c in cells.items()]
        text = "With the Transformer backbone, Conure against FineAll: " + ", ".join(
            f"{t} {cells['Conure'][t].mean:.4f} vs {cells['FineAll'][t].mean:.4f}" for t in seq[1:]) + "."
        out.append(("Table 6: the Transformer backbone", rows, _md_table(["model", *seq, "#B"], md), text))
    return out


# -- figures ---------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmaps(inp: ReportInputs, path: str) -> bool:
    """The accuracy matrix (row: after training task j; column: task i) of Conure and SinMoAll, first seed;
    colour: the value relative to the task's value at its own commit; text: the value."""
    panels = [(m, _by_variant(inp.outcomes, m)) for m in ("conure", "sinmoall")]
    panels = [(m, o[0]) for m, o in panels if o]
    if not panels:
        return False
    plt = _pyplot()
    n = len(inp.tasks)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 0.55 * n + 2.2), squeeze=False)
    for ax, (m, o) in zip(axes[0], panels):
        grid = np.full((n, n), np.nan)
        rel = np.full((n, n), np.nan)
        for j, after in enumerate(inp.tasks):
            for i, task in enumerate(inp.tasks[: j + 1]):
                v = next((r["value"] for r in o.accuracy if r["after_task"] == after and r["task"] == task
                          and r["metric"] == inp.metrics[task]), None)
                c = o.at_commit(task, inp.metrics[task])
                if v is not None:
                    grid[j, i] = v
                    rel[j, i] = v / c if c else np.nan
        im = ax.imshow(rel, vmin=0, vmax=1.2, cmap="RdYlGn")
        for j in range(n):
            for i in range(j + 1):
                if not np.isnan(grid[j, i]):
                    ax.text(i, j, f"{grid[j, i]:.3f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(n), inp.tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), [f"after {t}" for t in inp.tasks], fontsize=8)
        ax.set_title(f"{LABELS[m]} (seed {o.seed})")
    fig.colorbar(im, ax=list(axes[0]), label="value / value at the task's commit", shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def capacity_plot(inp: ReportInputs, path: str) -> bool:
    """Share of the backbone each task owns, and what stays free, for Conure and the prune-ratio sweep."""
    variants = [(v, _by_variant(inp.outcomes, v)) for v in ("conure", *(f"prune_{r:g}" for r in PRUNE_SWEEP), "embedding_conure")]
    variants = [(v, o[0]) for v, o in variants if o and o[0].capacity]
    if not variants:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(variants) + 1.5))
    for y, (v, o) in enumerate(variants):
        left = 0.0
        for k, t in enumerate(o.tasks):
            share = o.capacity.get(t, 0.0)
            ax.barh(y, share, left=left, color=f"C{k % 10}", label=t if y == 0 else None)
            left += share
        ax.barh(y, o.capacity.get("free", 0.0), left=left, color="lightgrey", label="free" if y == 0 else None)
    ax.set_yticks(range(len(variants)), [v for v, _ in variants])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the prunable backbone")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def retraining_plot(inp: ReportInputs, path: str) -> bool:
    """Validation metric of T2 per retraining epoch after pruning it by each ratio (Figure 6)."""
    if len(inp.tasks) < 2:
        return False
    t2 = inp.tasks[1]
    curves = [(r, _by_variant(inp.outcomes, f"prune_{r:g}")) for r in PRUNE_SWEEP]
    curves = [(r, o[0].histories.get(f"{t2}/retrain", [])) for r, o in curves if o]
    curves = [(r, h) for r, h in curves if h]
    if not curves:
        return False
    plt = _pyplot()
    key = f"val_{inp.metrics[t2]}"
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r, h in curves:
        ax.plot([e["epoch"] + 1 for e in h], [e.get(key, np.nan) for e in h], marker="o", label=f"pruned {r:.0%}")
    base = _by_variant(inp.outcomes, "conure")
    if base and base[0].best_validation.get(f"{t2}/train") is not None:
        ax.axhline(base[0].best_validation[f"{t2}/train"], color="k", ls="--", lw=1, label="before pruning (best)")
    ax.set_xlabel("retraining epoch")
    ax.set_ylabel(f"{t2} validation {inp.metrics[t2]}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# -- the report ---------------------------------------------------------------------------------------

INPUTS_FILE = "outcomes.json"


def load_inputs(out_dir: str) -> ReportInputs:
    """The inputs a report was made from (``OUT/outcomes.json``), to write it again."""
    import json

    path = os.path.join(out_dir, INPUTS_FILE)
    try:
        data = json.load(open(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no comparison results to write a report from (run --compare first)") from None
    data["outcomes"] = [Outcome(**o) for o in data["outcomes"]]
    return ReportInputs(**data)


def write_report(inp: ReportInputs, out_dir: str) -> str:
    """Write report.md, its CSVs and PNGs into ``out_dir`` (each file to a temporary name, then
    renamed), and the inputs as outcomes.json; returns the report's path."""
    import dataclasses
    import json

    from conure_dist import storage

    os.makedirs(out_dir, exist_ok=True)
    storage.write_bytes(os.path.join(out_dir, INPUTS_FILE), json.dumps(dataclasses.asdict(inp), indent=1).encode())
    csv_rows, t2_md, t2_text = table2(inp)
    files = {"table2.csv": csv_text(csv_rows, list(csv_rows[0])),
             "runs.csv": csv_text(outcome_rows(inp.outcomes), ("variant", "method", "seed", "phase", "task", "metric", "value"))}
    if inp.tuning:
        files["tuning.csv"] = csv_text(inp.tuning, list(inp.tuning[0]))
    s = inp.settings
    parts = [
        f"# {s.get('title', 'Comparison')}",
        "",
        f"Generated by `{inp.command}` in {s.get('wall_time', '?')} on {s.get('machine', 'this machine')}.",
        "",
        "## Setting",
        "",
        *(f"- {k}: {v}" for k, v in s.items() if k not in ("title", "wall_time", "machine")),
        "- test rows per task: " + ", ".join(f"{t} {inp.test_rows.get(t, '?')}" for t in inp.tasks),
        "- metrics: MRR@k for the sequence and item tasks, accuracy for class tasks, on each task's test split;"
        " cells are mean ± std over seeds; `*` marks a value not above Pop (the popularity / majority floor of the"
        " train split). table2.csv adds the 95% confidence interval of each mean; runs.csv has every value of every run.",
        "- methods: " + "; ".join(f"{LABELS.get(m.name, m.name)}: {m.summary}" for m in METHODS.values())
        + "; Conure-: Conure's value of each task right after its train stage, before pruning.",
        "",
    ]
    if inp.tuning:
        tasks = sorted({r["task"] for r in inp.tuning}, key=inp.tasks.index)
        points = sorted({(r["lr"], r["bpr_rho"]) for r in inp.tuning}, key=lambda p: (-p[0], str(p[1])))
        md = []
        for t in tasks:
            cells = []
            for lr, rho in points:
                hit = [r for r in inp.tuning if r["task"] == t and r["lr"] == lr and r["bpr_rho"] == rho]
                cells.append(f"{hit[0]['validation']:.4f}{' ←' if hit[0]['chosen'] else ''}" if hit else "")
            md.append([t, *cells])
        vf = inp.validation_floors or {}
        for row, t in zip(md, tasks):
            row.append(f"{vf[t]:.4f}" if t in vf else "")
        points_header = [*(f"lr {lr:g}" + (f", ρ {rho:g}" if rho != "" else "") for lr, rho in points), "Pop (validation)"]
        parts += ["## Tuning (validation split only)", "",
                  "Each later task's learning rate, and an item task's negative sampler (LambdaFM's ρ: 0.3, the paper's, "
                  "draws mostly popular labels as negatives; 1000 draws them almost uniformly), chosen by FineAll's best "
                  "validation metric (T1's train stage shared). The chosen setting (←) is used by every method. The "
                  "tuning runs have no test split.", "",
                  _md_table(["task", *points_header], md), ""]
    parts += ["## Table 2: every method", "", t2_md, "", "**What this shows.** " + t2_text, ""]
    for name, rows, md, text in ablation_tables(inp):
        slug = name.split(":")[0].lower().replace(" ", "")
        if rows:
            files[f"{slug}.csv"] = csv_text(rows, list(rows[0]))
        parts += [f"## {name}", "", md, "", "**What this shows.** " + (text or "(no values)"), ""]
    figures = []
    for fname, fn, caption in (("accuracy_matrix.png", heatmaps, "Accuracy matrices of Conure and SinMoAll"),
                               ("capacity.png", capacity_plot, "Capacity owned per task"),
                               ("retraining.png", retraining_plot, "Retraining after pruning (Figure 6)")):
        tmp = os.path.join(out_dir, f".{fname}.tmp.png")
        if fn(inp, tmp):
            os.replace(tmp, os.path.join(out_dir, fname))
            figures.append(f"![{caption}]({fname})")
    if figures:
        parts += ["## Figures", "", *figures, ""]
    files["report.md"] = "\n".join(parts)
    for name, text in files.items():
        storage.write_bytes(os.path.join(out_dir, name), text.encode())
    return os.path.join(out_dir, "report.md")
