"""How a search scores one configuration: the callbacks an :class:`~evefx.upgrade.UpgradeEnv` runs.

A configuration is applied to the trained model, optionally *prepared*, then evaluated:

* ``none``: evaluated as it is (AMC's accuracy without fine-tuning);
* ``bn_recalibrate``: the BatchNorm statistics are re-estimated on a few training batches first
  (EagleEye's adaptive BatchNorm): quantizing or pruning a layer shifts the statistics of what
  follows it, and stale running statistics make a good configuration look bad;
* ``finetune``: a short fine-tune first (HAQ), ``search.finetune_steps`` Adam steps.

Which one ranks configurations best is measured in docs/search.md (``bench/bench_search.py
--rank``); :data:`DEFAULT_EVALUATOR` is the winner.

Example:
    >>> env = UpgradeEnv(gm, Accuracy(val_loader), recalibrate=BNRecalibrate(train_set, batches=8))
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from evefx.errors import SearchError
from evefx.ptq.corrections import reestimate_bn
from evefx.spec.search import DEFAULT_EVALUATOR  # noqa: F401 - re-exported for readers of this module

__all__ = ["EVALUATORS", "DEFAULT_EVALUATOR", "accuracy_of", "apply_pruning", "Accuracy", "FineTune", "BNRecalibrate"]

EVALUATORS = ("none", "bn_recalibrate", "finetune")


def accuracy_of(result: Any) -> float:
    """Accuracy in percent from what an ``evaluate`` callback returned (a number or ``{"accuracy": ...}``)."""
    if isinstance(result, Mapping):
        if "accuracy" not in result:
            raise SearchError(f"evaluate(gm) returned a mapping without 'accuracy' (keys: {sorted(result)})")
        result = result["accuracy"]
    value = float(result)
    if not math.isfinite(value):
        raise SearchError(f"evaluate(gm) returned {value}; it must return a finite accuracy in percent")
    return value


def apply_pruning(gm: nn.Module) -> None:
    """Recompute the pruning masks from the ratios just set: ``evefx.prune_step`` run until every
    pruner's schedule is complete, so an iterative schedule reaches its full ratio at once.

    Example:
        >>> UpgradeEnv(gm, evaluate, apply=apply_pruning)  # the default when ratios are searched
    """
    from evefx.modules.prune import ChannelPruner
    from evefx.channels import prune_step

    pruners = [m for m in gm.modules() if isinstance(m, ChannelPruner)]
    for _ in range(max([m.steps - int(m.steps_done) for m in pruners] + [1])):
        prune_step(gm)


class Accuracy:
    """An ``evaluate`` callback: top-1 accuracy (percent) of the model on ``data`` (batches of ``(x, y)``).

    A plain class (not a closure) so it pickles into ``SubprocVecEnv`` workers.

    Example:
        >>> env = UpgradeEnv(gm, Accuracy(val_loader))
    """

    def __init__(self, data: Any):
        self.data = data

    def __call__(self, gm: nn.Module) -> float:
        from evefx.train import evaluate

        return evaluate(gm, self.data)["accuracy"]


class FineTune:
    """A ``finetune(gm, steps)`` callback: ``steps`` Adam steps on ``dataset``, shuffled the same way
    at every call (its own seeded generator), so an episode's result depends only on its values.

    Example:
        >>> env = UpgradeEnv(gm, Accuracy(val), finetune=FineTune(train_set), finetune_steps=20)
    """

    def __init__(self, dataset: Any, *, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
        self.dataset, self.batch_size, self.lr, self.seed = dataset, batch_size, lr, seed

    def __call__(self, gm: nn.Module, steps: int) -> None:
        from torch.utils.data import DataLoader

        from evefx.train import fit

        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed))
        epochs = max(1, math.ceil(steps / max(len(loader), 1)))
        fit(gm, loader, None, epochs, lr=self.lr, generator=torch.Generator().manual_seed(self.seed), progress=False,
            max_steps=steps, description="evaluator fine-tune", log_level=logging.DEBUG)  # one line per episode is the search's


class BNRecalibrate:
    """A ``recalibrate(gm)`` callback: re-estimate every BatchNorm's running statistics on
    ``batches`` batches of ``dataset`` (EagleEye's adaptive BatchNorm) with
    :func:`evefx.reestimate_bn`: plain averages, quantizer codes and pruning masks kept. The same
    batches every call.

    Example:
        >>> BNRecalibrate(train_set, batches=8)(gm)   # then score gm
    """

    def __init__(self, dataset: Any, *, batches: int = 8, batch_size: int = 64, seed: int = 0):
        if batches < 1:
            raise SearchError(f"search.evaluator.batches: must be >= 1 (got {batches})")
        self.dataset, self.batches, self.batch_size, self.seed = dataset, int(batches), int(batch_size), int(seed)

    def _inputs(self) -> list[Any]:
        """The batches, whole: ``(inputs..., labels)`` items stacked field by field (a model of two
        inputs gets both; :func:`evefx.reestimate_bn` drops the labels), bare tensors stacked."""
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        out: list[Any] = []
        for b in range(self.batches):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if not idx:
                break
            batch = default_collate([self.dataset[i] for i in idx])  # as a DataLoader stacks them
            out.append(tuple(batch) if isinstance(batch, list) else batch)
        return out

    def __call__(self, gm: nn.Module) -> None:
        reestimate_bn(gm, self._inputs(), include_frozen=True, progress=False)  # scored untrained: every BatchNorm
