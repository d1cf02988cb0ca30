"""The ``prune`` pass: a :class:`~evefx.modules.prune.ChannelPruner` after each selected layer's output block.

For every planned layer, in graph order, a pruner is inserted after ``layer -> [bn] -> [activation]``
with the layer's criterion, ratio, ``min_channels``, scope and schedule (``iterative`` steps), and
marked with role ``pruner``. With ``upgrade_ratio`` the ratio is an eve parameter in
``[0, max_ratio]``. A layer already marked by this pass is skipped, so running it twice changes nothing.

Nothing is masked yet: :func:`evefx.prune_step` sets the masks from the statistics the pruners
gather while the model trains, and :func:`evefx.compact` removes the masked channels.

Example:
    >>> gm = evefx.transform(DemoNet(), {"passes": [{"kind": "prune", "ratio": 0.5}]}, torch.zeros(1, 1, 28, 28))
    >>> [c.target for c in gm.report.changes]
    ['features_2_pruner', 'features_5_pruner', 'features_8_pruner', 'classifier_2_pruner']
"""
from __future__ import annotations

import logging

from torch import fx, nn

from evefx.errors import PassError
from evefx.graph import insert_after, output_block
from evefx.layers import out_channels
from evefx.modules.prune import ChannelPruner
from evefx.passes.base import Change, PassResult, SectionPass
from evefx.spec import PruneSection

__all__ = ["PrunePass"]

log = logging.getLogger(__name__)


class PrunePass(SectionPass[PruneSection]):
    """Runs one ``kind: prune`` section (see the module docstring).

    Example:
        >>> result = PrunePass(spec.passes[0], "passes[0]")(gm)
        >>> {c.action for c in result.changes}
        {'inserted'}
    """

    name = "prune"

    def call(self, gm: fx.GraphModule) -> PassResult:
        changes: list[Change] = []
        skipped: list[str] = []
        for layer, planned in self.plan(gm).items():
            node, module, section = planned.node, planned.module, planned.section
            if self.marked(gm, layer):
                skipped.append(layer)
                continue
            self.current_node = node
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                raise PassError(
                    f"{self.spec_path}: layer {layer} is a {type(module).__name__}; prune supports conv and Linear "
                    f"layers. Remove it from select."
                )
            steps = section.schedule.steps if section.schedule.kind == "iterative" else 1
            pruner = ChannelPruner(
                out_channels(module),
                section.criterion,
                section.ratio,
                dim=planned.channel_axis,
                max_ratio=section.max_ratio if section.upgrade_ratio else None,
                min_channels=section.min_channels,
                steps=steps,
                scope=section.scope,
                granularity=section.granularity,
            )
            pruner.train(module.training)
            last = output_block(gm, node).last
            new = insert_after(gm, last, pruner, f"{last.name}_pruner")
            self.mark(new, layer, "pruner", channel_axis=planned.channel_axis)
            changes.append(self.change(
                "inserted", new, layer,
                f"ChannelPruner({pruner.num_channels}, {section.criterion}, ratio={section.ratio:g}, {section.scope}"
                + (f", {section.granularity})" if section.granularity != "channel" else ")"),
            ))
        self.current_node = None
        self.warn_skipped(gm, skipped, "given a pruner")
        return PassResult(gm, bool(changes), tuple(changes))

    def ensures(self, gm: fx.GraphModule) -> None:
        for layer in self.plan(gm):
            if not self.marked(gm, layer, role="pruner"):
                raise PassError(f"{self.spec_path}: layer {layer} got no pruner; please report this bug")
