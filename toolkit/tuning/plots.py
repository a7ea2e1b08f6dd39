"""PNG plots of a tree tuning run (matplotlib, Agg backend): acceptance heatmap, the chosen tree, budget curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_acceptance_heatmap(accuracy: list[list[float]], path: str | Path) -> Path:
    """Head x rank heatmap of P(head i's rank-r candidate is the true token)."""
    depth, k = len(accuracy), len(accuracy[0]) if accuracy else 0
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 1.2 + 0.5 * depth))
    im = ax.imshow(accuracy, cmap="viridis", vmin=0.0, vmax=max(0.01, max(max(r) for r in accuracy)), aspect="auto")
    for i in range(depth):
        for r in range(k):
            ax.text(r, i, f"{accuracy[i][r]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(k))
    ax.set_yticks(range(depth), [f"head {i}" for i in range(depth)])
    ax.set_xlabel("rank of the true token in the head's top-k")
    ax.set_title("Per-head rank accuracy (calibration)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_tree(paths: list[tuple[int, ...]], probabilities: dict[tuple[int, ...], float], path: str | Path) -> Path:
    """The tree drawn left to right: x = depth, leaves spread on y, each node labelled rank (acceptance prob)."""
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for p in sorted(paths, key=lambda p: (len(p), p)):
        children.setdefault(p[:-1], []).append(p)
    y: dict[tuple[int, ...], float] = {}
    next_leaf = [0]

    def place(node: tuple[int, ...]) -> float:
        kids = children.get(node, [])
        if not kids:
            y[node] = float(next_leaf[0])
            next_leaf[0] += 1
        else:
            y[node] = sum(place(c) for c in kids) / len(kids)
        return y[node]

    place(())
    height = max(2.0, 0.28 * next_leaf[0])
    depth = max((len(p) for p in paths), default=0)
    fig, ax = plt.subplots(figsize=(2.0 + 1.8 * depth, height))
    for node in y:
        if node:
            ax.plot([len(node) - 1, len(node)], [y[node[:-1]], y[node]], color="0.6", lw=0.8, zorder=1)
    for node, yy in y.items():
        p = probabilities.get(node, 1.0)
        ax.scatter([len(node)], [yy], s=60, c=[p], cmap="viridis", vmin=0, vmax=1, zorder=2, edgecolors="k", lw=0.4)
        label = "root" if not node else f"{node[-1]} ({p:.2f})"
        ax.annotate(label, (len(node), yy), xytext=(5, 0), textcoords="offset points", va="center", fontsize=6)
    ax.set_xticks(range(depth + 1), ["root"] + [f"head {i}" for i in range(depth)])
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_title(f"Chosen tree: {len(paths) + 1} nodes; label = rank (joint acceptance probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_budget_curves(
    budgets: list[int],
    accept_length: list[float],
    tokens_per_second: list[float] | None,
    chosen: int,
    path: str | Path,
    measured: dict[str, tuple[int, float, float | None]] | None = None,
) -> Path:
    """Expected accepted length and predicted tokens/s vs node budget; `measured`: name -> (nodes, accept, tok/s)."""
    panels = 2 if tokens_per_second is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(budgets, accept_length, label="predicted")
    ax.axvline(chosen, color="r", ls="--", lw=0.8, label=f"chosen ({chosen} nodes)")
    for name, (n, acc, _) in (measured or {}).items():
        ax.scatter([n], [acc], marker="x", zorder=3)
        ax.annotate(name, (n, acc), xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax.set_xlabel("tree nodes per step (root included)")
    ax.set_ylabel("expected accepted length (tokens/step)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if tokens_per_second is not None:
        ax = axes[0][1]
        ax.plot(budgets, tokens_per_second, label="predicted")
        ax.axvline(chosen, color="r", ls="--", lw=0.8, label="chosen")
        for name, (n, _, tps) in (measured or {}).items():
            if tps is not None:
                ax.scatter([n], [tps], marker="x", zorder=3)
                ax.annotate(name, (n, tps), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.set_xlabel("tree nodes per step (root included)")
        ax.set_ylabel("decode tokens/s")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
