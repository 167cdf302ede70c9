"""Tables and plots from quality results (OUT/results.jsonl written by run.py).

    python benchmarks/quality/report.py benchmarks/results/quality-cpu [more folders or .jsonl files]

Writes OUT/report.md (markdown tables), OUT/summary.json (the same numbers plus run metadata) and PNGs:
accuracy with 95% Wilson intervals per task and policy, accuracy against budget (top-k vs AMS per scorer) when
several budgets ran, and the region wipe-out rate (top-k vs AMS at equal budget).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import qb_harness as H  # noqa: E402


def _group(rows, *fields):
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(f) for f in fields)].append(r)
    return groups


def _ratio(rows, field):
    num, den = H.pooled(rows, field)
    return (num / den if den else None), int(den)


def summarize(rows: list[dict]) -> dict:
    """Accuracy / CI / compression facts per (backend, model, task, policy), agreement, wipe-out pairs."""
    acc = []
    for (backend, model, task, phash), group in sorted(_group(rows, "backend", "model", "task", "policy_hash").items(),
                                                       key=lambda kv: (kv[0][:3], _order(kv[1][0]))):
        first = group[0]
        n, k = len(group), sum(bool(r["correct"]) for r in group)
        lo, hi = H.wilson(k, n)
        step, step_n = _ratio(group, "wipeout_step")
        fixed, fixed_n = _ratio(group, "wipeout_fixed32")
        jit, jit_n = _ratio(group, "jitter")
        mean = lambda f: (sum(r[f] for r in group if r.get(f) is not None) /  # noqa: E731
                          max(1, sum(r.get(f) is not None for r in group)))
        acc.append({"backend": backend, "model": model, "task": task, "policy_hash": phash,
                    "label": first["policy_label"], "policy": first["policy"], "scorer": first.get("scorer"),
                    "budget_frac": first.get("budget_frac"), "overrides": first.get("overrides") or {},
                    "n": n, "correct": k, "accuracy": k / n, "ci95": [lo, hi],
                    "budget_mean": mean("budget") if first["policy"] != "none" else None,
                    "compactions_mean": mean("compactions"), "peak_kv_mean": mean("peak_kv"),
                    "generated_mean": mean("n_generated"), "seconds_mean": mean("seconds"),
                    "wipeout_step": step, "wipeout_step_cells": step_n,
                    "wipeout_fixed32": fixed, "wipeout_fixed32_cells": fixed_n,
                    "jitter_tokens": jit, "jitter_boundaries": jit_n,
                    "segments_mean": mean("segments_mean") if first["policy"] == "ams" else None})
    return {"accuracy": acc, "agreement": agreement(rows), "wipeout_pairs": wipeout_pairs(acc),
            "ablations": ablations(acc)}


def ablations(acc: list[dict]) -> list[dict]:
    """AMS with overrides next to plain AMS (and top-k) of the same backend, model, task, scorer and budget."""
    variants = [a for a in acc if a["policy"] == "ams" and _is_ablation(a)]
    out = []
    for key in sorted({(a["backend"], a["model"], a["task"], a["scorer"], a["budget_frac"]) for a in variants}):
        same = [a for a in acc if (a["backend"], a["model"], a["task"], a["scorer"], a["budget_frac"]) == key]
        out += sorted(same, key=lambda a: (a["policy"] != "topk", bool(a["overrides"]), a["label"]))
    return out


ABLATION_KEYS = frozenset(k for a in H.ABLATIONS for k in a)


def _is_ablation(row) -> bool:
    return bool(ABLATION_KEYS & set(row.get("overrides") or {}))


def _order(row) -> tuple:
    p = {"none": 0, "streaming": 1, "topk": 2, "ams": 3}.get(row["policy"], 4)
    overrides = row.get("overrides") or {}
    return (row.get("scorer") or "", row.get("budget_frac") or 0, p, bool(overrides), json.dumps(overrides))


def agreement(rows: list[dict]) -> list[dict]:
    """Per (model, task, policy): examples run by both backends, and how many gave the same extracted answer."""
    by_key = _group(rows, "model", "task", "policy_hash", "example_id", "max_new_tokens")
    out = defaultdict(lambda: [0, 0, 0, None])
    for (model, task, phash, _, _), group in by_key.items():
        backends = {r["backend"]: r for r in group}
        if {"reference", "server"} <= set(backends):
            ref, srv = backends["reference"], backends["server"]
            entry = out[(model, task, phash)]
            entry[0] += 1
            entry[1] += ref["extracted"] == srv["extracted"]
            entry[2] += bool(ref["correct"]) == bool(srv["correct"])
            entry[3] = ref["policy_label"]
    return [{"model": m, "task": t, "policy_hash": p, "label": v[3], "examples": v[0], "same_answer": v[1],
             "same_correctness": v[2], "agreement": v[1] / v[0]} for (m, t, p), v in sorted(out.items())]


def wipeout_pairs(acc: list[dict]) -> list[dict]:
    """top-k against AMS (no ablation) at the same backend, model, task, scorer and budget. Overrides every row of a
    run shares (--set delta=...) are no ablation; an AMS row pairs with the top-k row of the same overrides, or else
    with the first top-k row of its key (top-k ignores the AMS settings)."""
    plain = [a for a in acc if not _is_ablation(a) and a["policy"] in ("topk", "ams")]
    key = lambda a: (a["backend"], a["model"], a["task"], a["scorer"], a["budget_frac"])  # noqa: E731
    out = []
    for ams in sorted((a for a in plain if a["policy"] == "ams"), key=lambda a: (key(a), a["label"])):
        candidates = [t for t in plain if t["policy"] == "topk" and key(t) == key(ams)]
        if not candidates:
            continue
        topk = next((t for t in candidates if t["overrides"] == ams["overrides"]), candidates[0])
        backend, model, task, scorer, budget = key(ams)
        out.append({"backend": backend, "model": model, "task": task, "scorer": scorer, "budget_frac": budget,
                    "ams_label": ams["label"], "topk_step": topk["wipeout_step"], "ams_step": ams["wipeout_step"],
                    "topk_fixed32": topk["wipeout_fixed32"], "ams_fixed32": ams["wipeout_fixed32"],
                    "ams_jitter": ams["jitter_tokens"],
                    "topk_accuracy": topk["accuracy"], "ams_accuracy": ams["accuracy"],
                    "topk_correct": topk["correct"], "ams_correct": ams["correct"], "n": min(topk["n"], ams["n"])})
    return out


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _num(x, digits=1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _section(title: str, intro: str, header: str, align: str, rows: list[str]) -> list[str]:
    """A markdown section: heading, optional intro paragraph, and a table."""
    return [title, ""] + ([intro, ""] if intro else []) + [header, align] + rows + [""]


def markdown(summary: dict) -> str:
    lines = []
    keys = sorted({(a["backend"], a["model"], a["task"]) for a in summary["accuracy"]})
    for backend, model, task in keys:
        rows = []
        for a in summary["accuracy"]:
            if (a["backend"], a["model"], a["task"]) != (backend, model, task):
                continue
            lo, hi = a["ci95"]
            rows.append(f"| {a['label']} | {a['n']} | {a['correct']}/{a['n']} = {_pct(a['accuracy'])} "
                        f"| [{_pct(lo)}, {_pct(hi)}] | {_num(a['budget_mean'], 0)} | {_num(a['compactions_mean'])} "
                        f"| {_num(a['peak_kv_mean'], 0)} | {_num(a['generated_mean'], 0)} "
                        f"| {_num(a['seconds_mean'])} | {_pct(a['wipeout_step'])} | {_pct(a['wipeout_fixed32'])} "
                        f"| {_num(a['jitter_tokens'], 2)} |")
        lines += _section(f"### {task} — {model}, {backend} backend", "",
                          "| policy | n | accuracy | 95% CI | budget | compactions | peak KV | gen. tokens | s/run "
                          "| wipe-out (steps) | wipe-out (32-tok) | jitter (tok) |",
                          "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", rows)
    if summary["wipeout_pairs"]:
        rows = [f"| {p['backend']} | {p['task']} | {p['ams_label']} | {p['budget_frac']:g} | {_pct(p['topk_step'])} "
                f"| {_pct(p['ams_step'])} | {_pct(p['topk_fixed32'])} | {_pct(p['ams_fixed32'])} "
                f"| {p['topk_correct']} ({_pct(p['topk_accuracy'])}) | {p['ams_correct']} ({_pct(p['ams_accuracy'])}) "
                f"| {p['n']} |" for p in summary["wipeout_pairs"]]
        lines += _section("### Global top-k vs AMS at equal budget: accuracy and region wipe-out rate",
                          "Fraction of (block, layer, KV head) with no kept token, over all compactions; blocks = "
                          "reasoning steps (lines of the generated text) or fixed 32-token blocks of the compressible "
                          "region (the reference path records them; the server path does not).",
                          "| backend | task | AMS policy | budget | top-k steps | AMS steps | top-k 32-tok | AMS 32-tok "
                          "| top-k correct | AMS correct | n |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                          rows)
    if summary["ablations"]:
        rows = [f"| {a['task']} | {a['label']} | {a['n']} | {_pct(a['accuracy'])} "
                f"| [{_pct(a['ci95'][0])}, {_pct(a['ci95'][1])}] "
                f"| {_num(a['segments_mean'])} | {_pct(a['wipeout_step'])} | {_pct(a['wipeout_fixed32'])} "
                f"| {_num(a['jitter_tokens'], 2)} |" for a in summary["ablations"]]
        lines += _section("### AMS ablations (DESIGN.md §2) and boundary jitter",
                          "Jitter: mean distance (logical tokens) from each AMS segment boundary to the nearest "
                          "boundary of the previous compaction, over the region compressible at both.",
                          "| task | variant | n | accuracy | 95% CI | segments/compaction | wipe-out (steps) "
                          "| wipe-out (32-tok) | jitter (tok) |", "|---|---|---:|---:|---|---:|---:|---:|---:|", rows)
    if summary["agreement"]:
        rows = [f"| {g['task']} | {g['label']} | {g['examples']} | {g['same_answer']} ({_pct(g['agreement'])})"
                f" | {g['same_correctness']} |" for g in summary["agreement"]]
        lines += _section("### Agreement between the reference and server paths", "",
                          "| task | policy | examples | same answer | same correctness |", "|---|---|---:|---:|---:|",
                          rows)
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    acc = summary["accuracy"]
    keys = sorted({(a["backend"], a["model"], a["task"]) for a in acc})
    if keys:
        fig, axes = plt.subplots(len(keys), 1, figsize=(max(6, 0.55 * max(
            sum(1 for a in acc if (a["backend"], a["model"], a["task"]) == k) for k in keys) + 2), 2.6 * len(keys)),
            squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            group = [a for a in acc if (a["backend"], a["model"], a["task"]) == key]
            x = range(len(group))
            vals = [a["accuracy"] for a in group]
            err = [[max(0.0, a["accuracy"] - a["ci95"][0]) for a in group],      # rounding can make these -1e-17
                   [max(0.0, a["ci95"][1] - a["accuracy"]) for a in group]]
            colors = [{"none": "grey", "streaming": "tab:green", "topk": "tab:blue", "ams": "tab:red"}.get(
                a["policy"], "black") if not _is_ablation(a) else "tab:orange" for a in group]
            ax.bar(x, vals, yerr=err, color=colors, capsize=3)
            ax.set_xticks(list(x))
            ax.set_xticklabels([a["label"] for a in group], rotation=30, ha="right", fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
            ax.set_title(f"{key[2]} ({key[1]}, {key[0]}; n = {group[0]['n']}, 95% Wilson CI)", fontsize=9)
        fig.tight_layout()
        path = out / "accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    curves = defaultdict(list)
    for a in acc:
        if a["policy"] in ("topk", "ams", "streaming") and not _is_ablation(a):
            curves[(a["backend"], a["model"], a["task"])].append(a)
    multi = {k: v for k, v in curves.items() if len({a["budget_frac"] for a in v}) > 1}
    if multi:
        fig, axes = plt.subplots(1, len(multi), figsize=(5 * len(multi), 3.6), squeeze=False)
        for ax, (key, group) in zip(axes[0], sorted(multi.items())):
            lines = defaultdict(list)
            for a in group:
                lines[(a["policy"], a["scorer"])].append((a["budget_frac"], a["accuracy"]))
            for (policy, scorer), pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        ls="-" if policy == "ams" else "--", label=f"{policy}/{scorer}")
            full = [a for a in acc if (a["backend"], a["model"], a["task"]) == key and a["policy"] == "none"]
            if full:
                ax.axhline(full[0]["accuracy"], color="grey", lw=1, label="full KV")
            ax.set_xlabel("budget (fraction of basis)")
            ax.set_ylabel("accuracy")
            ax.set_title(key[2], fontsize=9)
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / "accuracy_vs_budget.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    pairs = [p for p in summary["wipeout_pairs"] if p["topk_step"] is not None or p["topk_fixed32"] is not None]
    if pairs:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(pairs) + 2), 3.6))
        width = 0.2
        for i, (field, name, color) in enumerate((("topk_step", "top-k, steps", "tab:blue"),
                                                  ("ams_step", "AMS, steps", "tab:red"),
                                                  ("topk_fixed32", "top-k, 32-tok", "lightsteelblue"),
                                                  ("ams_fixed32", "AMS, 32-tok", "lightsalmon"))):
            ax.bar([j + (i - 1.5) * width for j in range(len(pairs))],
                   [p[field] or 0 for p in pairs], width, label=name, color=color)
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels([f"{p['task']}\n{p['scorer']}@{p['budget_frac']:g}" for p in pairs], fontsize=7)
        ax.set_ylabel("wiped-out fraction")
        ax.set_title("Region wipe-out rate: (block, layer, KV head) with no kept token", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "wipeout.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def make_report(out: str | Path, inputs: list[str | Path] | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for src in inputs or [out]:
        src = Path(src)
        rows += list(H.read_rows(H.results_file(src) if src.is_dir() else src))
    summary = summarize(rows)
    try:
        from results_io import metadata
        summary["meta"] = metadata()
    except Exception:        # noqa: BLE001 - metadata is a nicety
        pass
    summary["rows"] = len(rows)
    summary["seconds_total"] = round(sum(r.get("seconds") or 0 for r in rows), 1)
    md = markdown(summary)
    (out / "report.md").write_text(md + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    pngs = plot(summary, out) if rows else []
    print(md)
    print(f"wrote {out / 'report.md'}, {out / 'summary.json'}" + "".join(f", {p}" for p in pngs))
    return summary


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    make_report(args[0], args)
