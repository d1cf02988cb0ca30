"""Pictures of a search: the best configuration and the reward per episode (``search.png``).

Example:
    >>> plot_search(read_episodes("out/mp"), json.load(open("out/mp/best.json")), "mp.png")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["plot_search"]


def plot_search(rows: Sequence[dict[str, Any]], best: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """PNG of the best configuration's value per eve parameter and of the reward per episode.

    Example:
        >>> plot_search(read_episodes("out/mp"), json.load(open("out/mp/best.json")), "mp.png")
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(best["values"])
    ax1.bar(range(len(names)), [best["values"][n] for n in names], color="tab:blue")
    ax1.set_xticks(range(len(names)), [n.replace(".weight_quantizer", ".w").replace("_act_quant", ".a") for n in names],
                   rotation=60, ha="right", fontsize=7)
    ax1.set_ylabel("chosen value")
    ax1.set_title(f"best: episode {best['episode']}, acc {best['accuracy']:.2f}%, cost {best['cost']:.4g}")
    rewards = [r["reward"] for r in rows]
    ax2.plot(range(1, len(rows) + 1), rewards, ".", alpha=0.6, label="reward")
    ax2.plot(range(1, len(rows) + 1), np.maximum.accumulate(rewards), "-", label="best so far")
    ax2.set_xlabel("episode")
    ax2.set_ylabel("reward")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
