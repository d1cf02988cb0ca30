"""Recipes the CLI runs: data sets and training wired around the library (which imports neither).

``evefx search`` calls :func:`search_from_spec`: it loads the data ``--data`` names, trains the float model, runs a
short QAT, then hands the library's :func:`evefx.upgrade.search` an evaluator on a validation split.

Example:
    >>> from evefx.recipes import search_from_spec
    >>> search_from_spec(DemoNet(), "examples/specs/mixed_precision.yaml", run_dir="out/mp")
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from evefx.data import DataSplits, open_data
from evefx.errors import SearchError
from evefx.spec import Spec, load_spec
from evefx.upgrade.runlog import read_episodes
from evefx.upgrade.search import SearchResult

__all__ = ["search_from_spec"]

log = logging.getLogger(__name__)


def search_from_spec(
    model: nn.Module,
    spec: Spec | dict | str | Path,
    *,
    run_dir: str | Path,
    data: str | Path | DataSplits = "mnist5k",
    data_root: str | Path | None = None,
    weights: str | Path | None = None,
    epochs: int = 3,
    qat_epochs: int = 1,
    resume: bool = False,
    progress: bool = True,
    pareto_latency: bool = False,
) -> SearchResult:
    """What ``evefx search`` runs: train (or load) ``model``, transform it with ``spec``, search with
    ``spec.search``. ``data``: what ``--data`` names (``mnist5k``, ``mnist`` with ``data_root``, a
    ``.pt`` file of ``(inputs, labels)``; :func:`evefx.data.open_data`) or a :class:`~evefx.data.DataSplits`.
    The reward is scored on a validation split held out of the training part (the last 1,000 of
    MNIST-5k's 4,000 images; the last 5,000 of full MNIST; a file's last fifth), never on its test part.

    Each configuration is scored as ``search.evaluator`` says: BatchNorm statistics re-estimated
    on training batches, a short fine-tune on the training images, or neither.

    The starting weights are saved as ``run_dir/start.pt``; a resumed search loads them instead of
    training again, so its episodes continue from the very same model.

    Example:
        >>> search_from_spec(DemoNet(), "examples/specs/mixed_precision.yaml", run_dir="out/mp")
        $ evefx search --model examples.models:DemoNet --spec examples/specs/mixed_precision.yaml --run-dir out/mp
    """
    from torch.utils.data import DataLoader, Subset

    from evefx.pipeline import transform
    from evefx.train import fit
    from evefx.upgrade import Accuracy, BNRecalibrate, FineTune, search

    spec = load_spec(spec)
    if spec.search is None:
        raise SearchError("the spec has no search: section; add one (algorithm, episodes, budget...) to search it")
    if spec.search.backend == "ray":  # before training, not after
        from evefx.upgrade.ray_backend import import_ray

        import_ray()
    from evefx.api import eve_parameters

    source = data if isinstance(data, DataSplits) else open_data(data, data_root)
    if not source.labelled:
        raise SearchError(f"--data {source.name} holds no labels: a search scores accuracy, so it needs (inputs, labels)")
    example = source.inputs("train", 1)  # traced with the data's own inputs (token ids stay integers; a tuple for several)
    if not eve_parameters(transform(model, spec, example)):  # say it before minutes of training, not after
        raise SearchError("the spec has no eve parameters to search: set upgrade_bits: true in a quantize section "
                          "or upgrade_ratio: true in a prune section")
    full, n_val = source.train, source.validation_size
    train, val = Subset(full, range(len(full) - n_val)), Subset(full, range(len(full) - n_val, len(full)))
    loader = lambda: DataLoader(train, batch_size=64, shuffle=True,  # noqa: E731
                                generator=torch.Generator().manual_seed(spec.search.seed))
    run_dir = Path(run_dir)
    if not resume and read_episodes(run_dir):
        raise SearchError(f"{run_dir} already holds a search; pass --resume {run_dir} to go on with it, or choose another folder")
    start = run_dir / "start.pt"
    gm = None
    if resume and start.exists():
        gm = transform(model, spec, example)
        gm.load_state_dict(torch.load(start))
        log.info("resume: starting weights loaded from %s", start)
    else:
        if weights is not None:
            from evefx.api import load_checkpoint

            load_checkpoint(model, weights, "--weights", saved_from="the float model (torch.save(model.state_dict()))")
        elif epochs > 0:
            fit(model, loader(), None, epochs, lr=3e-3, seed=spec.search.seed, progress=progress, description="float")
        gm = transform(model.eval(), spec, example)
        if qat_epochs > 0 and any(p.requires_grad for p in gm.parameters()):
            fit(gm, loader(), None, qat_epochs, lr=1e-3, seed=spec.search.seed, progress=progress, description="calibrate")
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(gm.state_dict(), start)
    gm.eval()
    batch = source.inputs("train", min(64, len(train)))  # activation statistics for observations (train's first items)
    return search(gm, Accuracy(DataLoader(val, batch_size=500)), spec.search, run_dir=run_dir, spec=spec,
                  finetune=FineTune(train, seed=spec.search.seed),
                  recalibrate=BNRecalibrate(train, batches=spec.search.evaluator.batches, seed=spec.search.seed),
                  example_inputs=batch, resume=resume, pareto_latency=pareto_latency,
                  progress=progress)
