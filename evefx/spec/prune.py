"""``kind: prune``: channel pruning by statistics, dependency-aware, compacted for real."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from evefx.spec.base import Bounded, Section, StrictModel

__all__ = ["OneShot", "Iterative", "PruneSection"]


class OneShot(StrictModel):
    """Prune to the target ratio at the first ``prune_step``."""

    kind: Literal["one_shot"]


class Iterative(StrictModel):
    """Reach the target ratio in ``steps`` equal increments, one per ``prune_step``."""

    kind: Literal["iterative"]
    steps: Bounded(int, 1, 1000) = 4


class PruneSection(Section):
    """Mask the output channels of the selected layers by a statistic.

    Example (YAML):
        - kind: prune
          criterion: l1_norm
          ratio: 0.5
    """

    kind: Literal["prune"]
    exclude_last: bool = True
    """The classifier's outputs are the model's outputs: never prune them."""
    criterion: Literal["l1_norm", "fire_rate", "kl_div", "taylor"] = "l1_norm"
    """l1_norm: weight magnitude; fire_rate: fraction of positive outputs; kl_div: how far a channel's
    output distribution departs from the layer's; taylor: |activation x gradient| (first order)."""
    ratio: Bounded(float, 0.0, 0.99) = 0.5
    """Fraction of output channels to prune (an eve parameter with ``upgrade_ratio``)."""
    scope: Literal["layer", "global"] = "layer"
    """Rank channels within each layer, or in one ranking across every selected layer."""
    upgrade_ratio: bool = False
    """Expose the ratio as an eve parameter in [0, max_ratio] for the upgrader."""
    max_ratio: Bounded(float, 0.0, 0.99) = 0.9
    """Highest ratio the upgrader may choose."""
    min_channels: Bounded(int, 1, 1 << 20) = 1
    """Never keep fewer channels than this in a layer."""
    granularity: Literal["channel", "head"] = "channel"
    """Where a Linear's features are split into attention heads (a reshape to ``(..., heads, head_dim)``):
    ``head`` prunes whole heads (q/k/v rows and the output projection's columns of a head together,
    ``num_heads`` rewritten), ``channel`` prunes ``head_dim`` uniformly across heads (q with k, v with
    the output projection). Elsewhere (MLP widths, convs) channels are pruned either way. The residual
    stream a LayerNorm reads is never pruned (see evefx.channels.attention_rules)."""
    schedule: Annotated[Union[OneShot, Iterative], Field(discriminator="kind")] = OneShot(kind="one_shot")

    @model_validator(mode="after")
    def _ratio_range(self) -> PruneSection:
        if self.upgrade_ratio and self.ratio > self.max_ratio:
            raise ValueError(f"ratio ({self.ratio}) exceeds max_ratio ({self.max_ratio})")
        return self
