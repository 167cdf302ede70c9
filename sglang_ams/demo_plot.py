"""The demo's picture: which token positions each policy still holds at the end of generation.

One panel per policy; in a panel one row per prompt, x the logical token position, the shade the fraction of
(layer, KV head) pairs that kept the token. The needle sentence and the question are outlined in every row; the
row's answer and whether it is right sit at the right edge. Every text lives outside the image area (titles above,
labels left and right, the legend below), so nothing overlaps.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:       # (demo imports this module when it draws: no import back)
    from .demo import TaskOutcome

SPAN_STYLE = {"needle": ("red", "needle sentence"), "question": ("orange", "question")}


def _grid(outcomes: list[TaskOutcome], policy: str) -> torch.Tensor:
    rows = [o.survival(policy) for o in outcomes]
    grid = torch.full((len(rows), max(r.numel() for r in rows)), float("nan"))
    for i, r in enumerate(rows):
        grid[i, :r.numel()] = r
    return grid


def _right_label(outcome: TaskOutcome, policy: str) -> str:
    kept = outcome.span_kept(policy, "needle")
    return outcome.short_answer(policy) + ("" if kept is None else f", needle {kept:.0%} kept")


def plot_kept(outcomes: list[TaskOutcome], out: str | os.PathLike, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    policies = list(outcomes[0].results)
    n = len(outcomes)
    fig, axes = plt.subplots(len(policies), 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=(12, 1.3 + len(policies) * (0.9 + 0.28 * n)))
    axes = axes[:, 0]
    # A square-root colour scale: at a 10 % budget most kept fractions are small, and they are the point.
    norm = PowerNorm(0.5, vmin=0, vmax=1)
    image = None
    for ax, policy in zip(axes, policies):
        grid = _grid(outcomes, policy)
        image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", norm=norm,
                          extent=(0, grid.shape[1], n - 0.5, -0.5))
        for row, o in enumerate(outcomes):
            for span, (start, end) in o.task.spans.items():
                color = SPAN_STYLE.get(span, ("white", span))[0]
                ax.add_patch(Rectangle((start, row - 0.45), end - start, 0.9, fill=False, edgecolor=color, lw=1.4))
            ax.plot([len(o.task.prompt_ids)] * 2, [row - 0.5, row + 0.5], color="white", lw=1, ls=":")
        ax.set_yticks(range(n), [o.task.label for o in outcomes], fontsize=8)
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(n), [_right_label(o, policy) for o in outcomes], fontsize=8)
        right.tick_params(length=0)
        correct = sum(o.correct(policy) for o in outcomes)
        ax.set_title(f"{policy}: {correct}/{n} correct", loc="left", fontsize=9, fontweight="bold")
    parts = "prompt, given answer start, generated answer" if any(o.task.forced_ids for o in outcomes) \
        else "prompt, generated answer"
    axes[-1].set_xlabel(f"logical token position ({parts})", fontsize=9)
    handles = [Patch(fill=False, edgecolor=color, lw=1.4, label=label)
               for span, (color, label) in SPAN_STYLE.items() if any(span in o.task.spans for o in outcomes)]
    handles.append(Line2D([], [], color="grey", lw=1, ls=":", label="end of the prompt"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    bar = fig.colorbar(image, ax=list(axes), fraction=0.025, pad=0.01)
    bar.set_label("fraction of (layer, KV head) pairs keeping the token", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9, linespacing=1.5)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
