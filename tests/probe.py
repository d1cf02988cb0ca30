"""A tiny section pass used by the core tests: it inserts an eve-protocol probe after each
selected layer's output block. It stands in for the real passes so the core is tested alone."""
from __future__ import annotations

import torch
from torch import nn

from evefx.graph import insert_after, mark, marked, output_block
from evefx.modules.protocol import EveHooks, EveRange
from evefx.passes.base import PassResult, SectionPass


class Probe(EveHooks, nn.Module):
    """Identity that counts calls, has one eve parameter ``gain`` (used only when ``active``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.tensor(1.0))
        self.calls = 0
        self.active = True

    def eve_ranges(self):
        return {"gain": EveRange(0.0, 2.0)}

    def observations(self):
        return {"calls": float(self.calls)}

    def reset_state(self):
        self.calls = 0

    def set_mode(self, **flags):
        if "pruned" in flags:
            self.active = flags["pruned"]

    def forward(self, x):
        self.calls += 1
        return x * self.gain if self.active else x


class ProbePass(SectionPass):
    name = "probe"

    def call(self, gm):
        changes = []
        for layer, planned in self.plan(gm).items():
            if marked(gm, self.name, layer):
                continue
            self.current_node = planned.node
            last = output_block(gm, planned.node).last
            new = insert_after(gm, last, Probe(), f"{layer}.probe")
            mark(new, pass_name=self.name, layer=layer, spec_path=self.spec_path, role="probe")
            changes.append(self.change("inserted", new, layer, "Probe"))
        return PassResult(gm, bool(changes), tuple(changes))
