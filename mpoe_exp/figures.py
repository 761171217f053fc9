"""Figures for `make tables`, as PNG next to the tables (runs/<experiment>/tables/):

- `params_<table>.png`: the table's headline column (GLUE average, WikiText-2 perplexity) against total parameters,
  one colour per row; ours filled with the seed std as an error bar, the paper's hollow: the paper's claim is that
  MPOE sits at the score of the big MoE models with a fraction of their parameters.
- `curves_<model>_<task>.png`: training loss and the validation main metric against the optimizer step, one colour
  per method, one thin line per seed, for the hyperparameter setting `make tables` selected.
- `routing_<model>_<method>_<task>.png`: the experts' load, a heatmap of routed layers x experts (the fraction of
  token choices each expert got in the best checkpoint's validation pass), averaged over the selected setting's
  seeds; only for runs with routing telemetry (not dense models, not older results files).

Reads only what aggregate.py aggregated from results.json files; Matplotlib with the Agg backend (no display).
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mpoe_exp.aggregate import GroupKey, Selection, Table, routing_load  # noqa: E402


def _save(fig, path: Path) -> Path:
    """Write the figure atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def params_figure(table: Table, column: str, out_dir: Path) -> Path | None:
    """`column` of every row against total parameters (log scale), ours beside the paper's; None if nothing to plot."""
    index = table.columns.index(column)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for k, row in enumerate(table.rows):
        cell, colour = row.cells[index], colours(k % 10)
        label = row.label if row.reference else f"{row.label} ({row.model})"
        if cell.paper is not None and row.params_paper is not None:
            ax.scatter(
                row.params_paper, cell.paper, s=60, facecolors="none", edgecolors=[colour], label=f"{label}, paper"
            )
            plotted = True
        if cell.ours is not None and row.params_ours:
            params = sum(row.params_ours) / len(row.params_ours)
            ax.errorbar(params, cell.ours.mean, yerr=cell.ours.std or 0.0, fmt="s", color=colour, capsize=3,
                        label=f"{label}, ours (n={cell.ours.n})")  # fmt: skip
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("total parameters (millions, log scale)")
    ax.set_ylabel(column)
    ax.set_title(f"{table.title}\n{column} against parameters (hollow: paper, filled: ours)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, out_dir / f"params_{table.name}.png")


def curves_figures(selections: dict[GroupKey, Selection], experiment: str, out_dir: Path) -> list[Path]:
    """One figure per (model, task) of the experiment: loss and validation metric per step, per method and seed."""
    by_model_task: dict[tuple[str, str], list[Selection]] = defaultdict(list)
    for key, sel in selections.items():
        if key[0] == experiment and any(r.history for r in sel.runs):
            by_model_task[(key[1], key[3])].append(sel)
    written = []
    colours = plt.get_cmap("tab10")
    for (model, task), sels in sorted(by_model_task.items()):
        fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
        metric = None
        for k, sel in enumerate(sorted(sels, key=lambda s: s.key[2])):
            colour = colours(k % 10)
            for j, run in enumerate(sorted(sel.runs, key=lambda r: str(r.seed))):
                history = run.history or []
                metric = run.main_metric
                steps = [h["step"] for h in history]
                label = f"{sel.key[2]} ({len(sel.runs)} seed{'s' if len(sel.runs) != 1 else ''})" if j == 0 else None
                loss_ax.plot(steps, [h["loss"] for h in history], color=colour, lw=1, alpha=0.8, label=label)
                values = [h["validation"].get(metric) for h in history]
                metric_ax.plot(steps, values, color=colour, lw=1, alpha=0.8, marker=".", label=label)
        ran = sorted({str(r.model) for sel in sels for r in sel.runs} - {model})
        who = f"{model} (ran {', '.join(ran)})" if ran else model
        title = f"{who} on {task}: training loss"
        loss_ax.set(xlabel="optimizer step", ylabel="training loss (aux losses included)", title=title)
        metric_ax.set(xlabel="optimizer step", ylabel=f"validation {metric}", title=f"validation {metric}")
        for ax in (loss_ax, metric_ax):
            ax.grid(True, alpha=0.3)
        metric_ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"curves_{model}_{task}.png"))
    return written


def routing_figures(selections: dict[GroupKey, Selection], experiment: str, out_dir: Path) -> list[Path]:
    """One heatmap (layers x experts, fraction of token choices) per model/method/task with routing telemetry."""
    written = []
    for key, sel in sorted(selections.items()):
        routing = routing_load(sel) if key[0] == experiment else None
        if routing is None:
            continue
        _, model, method, task = key
        n_layers, n_experts = routing.load.shape
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n_experts + 4), max(2.5, 0.3 * n_layers + 1.5)))
        image = ax.imshow(routing.load, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
        if n_layers * n_experts <= 256:  # small enough to print each value
            bright = 0.6 * np.nanmax(routing.load)
            for (i, j), value in np.ndenumerate(routing.load):
                if np.isfinite(value):
                    colour = "k" if value > bright else "w"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(n_layers), routing.layers, fontsize=7)
        ax.set_xlabel("expert")
        ran = sorted({str(r.model) for r in sel.runs} - {model})
        who = f"{model}/{method}" + (f" (ran {', '.join(ran)})" if ran else "")
        seeds = f"{len(routing.seeds)} seed{'s' if len(routing.seeds) != 1 else ''}"
        ax.set_title(f"{who} on {task}: expert load at the best checkpoint (mean of {seeds}; "
                     f"uniform = 1/{n_experts} = {1 / n_experts:.3f})", fontsize=9)  # fmt: skip
        fig.colorbar(image, ax=ax, label="fraction of token choices")
        written.append(_save(fig, out_dir / f"routing_{model}_{method}_{task}.png"))
    return written
