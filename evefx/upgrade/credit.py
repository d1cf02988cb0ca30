"""Reward credit of an off-policy agent: what reward each stored transition of an episode carries.

``reward.credit: all`` (HAQ, AMC) gives every transition of a finished episode its reward;
``reward.baseline: ema`` subtracts a moving average of the earlier episodes' rewards. A resumed
search puts logged episodes back into the replay buffer with the very same credited rewards.

Example:
    >>> c = Credit(Reward(baseline="ema", baseline_decay=0.5)); [c.next(r) for r in (0.5, 0.7)]
    [0.0, 0.2]
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from evefx.spec import Reward
from evefx.upgrade.env import UpgradeEnv

__all__ = ["Credit", "set_stored_rewards", "replay_into_buffer"]

log = logging.getLogger(__name__)


class Credit:
    """The reward an off-policy agent is trained on for each finished episode, in order
    (``reward.baseline``): the episode's reward, less an exponential moving average of the rewards
    of the episodes before it with ``baseline: ema`` (the first episode is its own baseline).
    ``every``: the reward goes on all of the episode's transitions (``reward.credit: all``).

    Example:
        >>> c = Credit(Reward(baseline="ema", baseline_decay=0.5), [0.5, 0.7]); c.next(0.9)  # 0.9 - (0.5 * 0.5 + 0.5 * 0.7)
    """

    def __init__(self, cfg: Reward, rewards: Sequence[float] = ()):
        self.cfg = cfg
        self.baseline: float | None = None
        for r in rewards:
            self.next(r)

    @property
    def every(self) -> bool:
        return self.cfg.credit == "all"

    @property
    def rewrites(self) -> bool:
        """True when stored rewards differ from what ``UpgradeEnv.step`` returned."""
        return self.cfg.credit != "last" or self.cfg.baseline != "none"

    def next(self, reward: float) -> float:
        """The trained-on reward of the next finished episode, which earned ``reward``."""
        if self.cfg.baseline == "none":
            return float(reward)
        base = float(reward) if self.baseline is None else self.baseline
        d = float(self.cfg.baseline_decay)
        self.baseline = d * base + (1.0 - d) * float(reward)
        return float(reward) - base


def set_stored_rewards(buf: Any, env_index: int, back: Sequence[int], value: float) -> None:
    """Reward ``value`` on environment ``env_index``'s transitions added ``k`` additions ago, for each
    ``k`` in ``back`` (1: the latest; the buffer is circular, ``rewards`` of shape [buffer_size, n_envs])."""
    for k in back:
        buf.rewards[(buf.pos - k) % buf.buffer_size, env_index] = value


def replay_into_buffer(model: Any, env: UpgradeEnv, rows: Sequence[dict[str, Any]],
                        credited: Sequence[float] | None = None) -> int:
    """Put logged episodes back into an off-policy model's replay buffer; returns transitions added.
    ``credited``: the reward each episode is trained on (default: its logged reward), placed as
    ``reward.credit`` says, as the live search stores it."""
    buf = model.replay_buffer
    credited = [r["reward"] for r in rows] if credited is None else credited
    trans = [t for r, c in zip(rows, credited) for t in env.transitions(r["actions"], c)]
    n = buf.n_envs
    usable = len(trans) - len(trans) % n
    for i in range(0, usable, n):
        chunk = trans[i:i + n]
        buf.add(np.stack([t[0] for t in chunk]), np.stack([t[3] for t in chunk]), np.stack([t[1] for t in chunk]),
                np.asarray([t[2] for t in chunk], dtype=np.float32), np.asarray([t[4] for t in chunk]),
                [{} for _ in chunk])
    if usable < len(trans):
        log.info("resume: %d logged transitions did not fill a whole batch of %d environments; skipped", len(trans) - usable, n)
    return usable
