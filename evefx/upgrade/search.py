"""``evefx.upgrade.search``: find eve parameters with a search method, all in one harness.

The method is ``search.algorithm``: a stable-baselines3 agent playing
:class:`~evefx.upgrade.env.UpgradeEnv` episodes (:mod:`.agent`), or a baseline (:mod:`.baselines`:
random, uniform, greedy/knapsack/ilp from sensitivities, Optuna TPE). Every method gets at most
``search.episodes`` evaluations (sensitivity probes count) and the same evaluator
(``search.evaluator``). The run folder records everything needed to stop and go on:

* ``episodes.csv``: one row per evaluated configuration (reward, accuracy, cost, values, actions);
* ``best.json``: the best configuration so far; ``search.json``: what is being searched;
* ``sensitivity.json``: the sensitivity probes (greedy, knapsack, ilp, or an agent's warm start);
* ``checkpoint/``: an agent's SB3 model and replay buffer every ``checkpoint_every`` episodes;
* ``tb/``: TensorBoard logs (SB3's logger plus ``search/*`` scalars);
* at the end ``best.yaml`` (the input spec with the chosen values as per-layer overrides),
  ``best.pt`` (the configured weights), ``search.png``, and ``pareto.csv``/``pareto.png``.

A resumed search reloads the last checkpoint, puts the episodes logged after it back into the
replay buffer (their rewards are in the CSV, so nothing is evaluated twice) and plays the
remaining episodes: only the episode in flight when the run stopped is lost.

Example:
    >>> result = search(gm, lambda m: evaluate(m, val)["accuracy"], gm.spec.search, run_dir="out/mp")
    >>> result.best["accuracy"], result.spec_path
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from evefx.errors import SearchError
from evefx.spec import SearchSection, Spec, dump_spec, load_spec
from evefx.spec.search import DEFAULT_FINETUNE_STEPS, SEARCH_ALGORITHMS
from evefx.upgrade.agent import DEFAULT_EPISODES, EnvFactory, search_sb3
from evefx.upgrade.allocation import allocatable
from evefx.upgrade.baselines import BASELINES, baseline_values, play_baseline, probes_for
from evefx.upgrade.env import Evaluate, Finetune, UpgradeEnv
from evefx.upgrade.evaluators import BNRecalibrate
from evefx.upgrade.pareto import pareto_rows, write_pareto
from evefx.upgrade.plots import plot_search
from evefx.upgrade.runlog import RunLog, read_episodes, write_json
from evefx.upgrade.specs import spec_with_values

__all__ = ["SearchResult", "search", "ALGORITHMS"]

log = logging.getLogger(__name__)

ALGORITHMS = SEARCH_ALGORITHMS


class _InRunDir:
    """A file of the run folder, read as an attribute: ``result.spec_path == result.run_dir / "best.yaml"``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, result: Any, owner: type | None = None) -> Any:
        return self if result is None else result.run_dir / self.name


@dataclass
class SearchResult:
    """What :func:`search` found and where it wrote it.

    Example:
        >>> r = search(...); r.best["values"]; evefx.load_spec(r.spec_path)
    """

    best: dict[str, Any]
    """The best episode: ``episode``, ``reward``, ``accuracy``, ``cost``, ``values``."""
    spec: Spec
    """The input spec with the best values written as overrides (also in ``best.yaml``)."""
    run_dir: Path
    episodes: list[dict[str, Any]] = field(repr=False, default_factory=list)
    replayed_accuracy: float | None = None
    """Accuracy of the best configuration applied again at the end (equals ``best["accuracy"]``
    when evaluation and fine-tuning are deterministic)."""
    probes: int = 0
    """Evaluations spent on sensitivity probes (not in ``episodes``)."""

    spec_path = _InRunDir("best.yaml")
    state_path = _InRunDir("best.pt")
    """The weights of the best configuration."""
    plot_path = _InRunDir("search.png")
    pareto_path = _InRunDir("pareto.csv")


def _evaluations(section: SearchSection, ep_len: int) -> int:
    if section.episodes is not None:
        return int(section.episodes)
    if section.timesteps is not None:
        return max(1, math.ceil(section.timesteps / ep_len))
    return DEFAULT_EPISODES


def _recalibrate(section: SearchSection, gm: nn.Module, given: Callable[[nn.Module], Any] | None,
                 example_inputs: Any) -> Callable[[nn.Module], Any] | None:
    """The BatchNorm re-estimation ``search.evaluator`` asks for (None for the other evaluators)."""
    if section.evaluator_kind != "bn_recalibrate":
        return None
    if given is not None:
        return given
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules()):
        return None  # nothing to re-estimate
    if example_inputs is None:
        raise SearchError("search.evaluator.kind bn_recalibrate: pass recalibrate=BNRecalibrate(train_set) "
                          "(or example_inputs=) to re-estimate the BatchNorm statistics, or set evaluator.kind: none")
    batch = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    return BNRecalibrate([(x, 0) for x in batch], batches=1, batch_size=len(batch))


def _warm_start(section: SearchSection) -> str | None:
    ws = section.hyperparams.get("warm_start")
    if ws is not None and section.algorithm in BASELINES:
        raise SearchError(f"search.hyperparams.warm_start: only an RL agent warm-starts ({section.algorithm} is a baseline)")
    return ws


def search(
    gm: fx.GraphModule,
    evaluate: Evaluate,
    section: SearchSection | dict[str, Any] | None = None,
    *,
    run_dir: str | Path,
    spec: Spec | dict | str | Path | None = None,
    finetune: Finetune | None = None,
    recalibrate: Callable[[nn.Module], Any] | None = None,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    apply: Callable[[nn.Module], Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    pareto_latency: bool = False,
) -> SearchResult:
    """Search ``gm``'s eve parameters; write the run folder and ``best.yaml``; return the best.

    Args:
        gm: the trained, transformed model (its weights are the start of every episode).
        evaluate: ``evaluate(gm) -> accuracy`` in percent (or ``{"accuracy": ...}``); use held-out data.
        section: the ``search:`` settings (default: ``gm.spec.search``).
        run_dir: folder for logs, checkpoints and results.
        spec: the spec ``gm`` was transformed with (default: ``gm.spec``); ``best.yaml`` extends it.
        finetune: ``finetune(gm, steps)`` for ``evaluator.kind: finetune``, the default (``section.finetune_steps``,
            100 when 0); e.g. ``FineTune(train_set)``. Without one, an unset evaluator means ``none``.
        recalibrate: ``recalibrate(gm)`` for ``evaluator.kind: bn_recalibrate`` (default: the BatchNorm
            statistics re-estimated on ``example_inputs``); e.g. ``BNRecalibrate(train_set)``.
        example_inputs: a batch for activation statistics and latency (default: zeros of ``trace.input_shape``).
        apply: ``apply(gm)`` after setting values (e.g. to recompute pruning masks).
        resume: go on from ``run_dir`` (refuses a non-empty folder otherwise).
        pareto_latency: also time the configurations on the Pareto fronts with onnxruntime.

    Example:
        >>> result = search(gm, evaluate, {"algorithm": "ilp", "episodes": 50, "budget": {"kind": "avg_bits", "max": 3}},
        ...                 run_dir="out/ilp", recalibrate=BNRecalibrate(train_set))
    """
    spec = load_spec(spec) if spec is not None else getattr(gm, "spec", None)
    if spec is None:
        raise SearchError("search needs the spec gm was transformed with: pass spec= (or search an EveModule)")
    if section is None:
        section = spec.search or SearchSection()
    elif isinstance(section, dict):
        section = load_spec({**spec.model_dump(mode="json"), "search": section}).search
    assert isinstance(section, SearchSection)
    if section.backend == "ray":  # say a missing extra before any work is done
        from evefx.upgrade.ray_backend import import_ray

        import_ray()
    warm = _warm_start(section)
    if example_inputs is None and spec.trace.input_shape is not None:
        example_inputs = torch.zeros(spec.trace.input_shape)
    run_dir = Path(run_dir)
    rows = read_episodes(run_dir)
    if rows and not resume:
        raise SearchError(f"{run_dir} already holds a search ({len(rows)} episodes); pass resume=True "
                          "(--resume) to go on with it, or choose another folder")
    if section.evaluator.kind is None and section.finetune_steps == 0 and finetune is None:
        # the default evaluator fine-tunes; without a finetune callback the library cannot
        log.warning("search: no finetune callback for the default evaluator (a %d-step fine-tune); configurations "
                    "are evaluated as applied (set search.evaluator.kind to silence this)", DEFAULT_FINETUNE_STEPS)
        section = section.model_copy(update={"evaluator": section.evaluator.model_copy(update={"kind": "none"})})
    env_kwargs = dict(finetune=finetune, finetune_steps=section.evaluator_steps,
                      budget=section.budget, reward=section.reward, example_inputs=example_inputs, apply=apply,
                      recalibrate=_recalibrate(section, gm, recalibrate, example_inputs))
    env = UpgradeEnv(gm, evaluate, **env_kwargs)
    if section.algorithm is None:  # the measured defaults (docs/search.md): the ILP where it applies,
        # random search otherwise (on pruning ratios it was at least as good as DDPG on both bench networks)
        default = "ddpg" if warm is not None else "ilp" if allocatable(env) else "random"
        section = section.model_copy(update={"algorithm": default})
    names = [p.name for p in env.params]
    evaluations = _evaluations(section, len(names))
    probes = probes_for(section, env, section.algorithm if section.algorithm in BASELINES else warm)
    target = evaluations - probes
    if target < 1:
        raise SearchError(f"search.episodes: {evaluations} evaluations leave none after the {probes} sensitivity probes; "
                          f"give at least {probes + 1} (or fewer hyperparams.sensitivity_bits)")
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the settings are known to work: no stray folder
    meta = {"parameters": names, "section": section.model_dump(mode="json")}
    meta_path = run_dir / "search.json"
    if resume and meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old["parameters"] != names:
            raise SearchError(f"--resume: {run_dir} searched the eve parameters {old['parameters']}, this model has {names}; "
                              "resume with the same model and spec")
        if old["section"]["algorithm"] != section.algorithm:
            raise SearchError(f"--resume: {run_dir} was searched with {old['section']['algorithm']}, not {section.algorithm}")
    write_json(meta_path, meta)
    if rows:
        log.info("resuming %s: %d of %d episodes already done", run_dir, len(rows), target)
    try:
        with RunLog(run_dir, rows, target, progress) as runlog:
            if section.algorithm in BASELINES:
                from stable_baselines3.common.logger import configure

                runlog.logger, runlog.autodump = configure(str(run_dir / "tb" / section.algorithm), ["tensorboard"]), True
                play_baseline(section, env, runlog, EnvFactory(gm, evaluate, env_kwargs))
            else:
                if warm is not None and runlog.done == 0:  # the baseline's pick is the agent's first episode
                    values = baseline_values(section, env, warm, k=1, run_dir=run_dir)[0]
                    runlog.record(env.evaluate_values(values, env.actions_for(values)))
                search_sb3(section, env, EnvFactory(gm, evaluate, env_kwargs), runlog, run_dir, list(runlog.rows))
            rows, best = runlog.rows, runlog.best
        if best is None:
            raise SearchError("the search finished without a single episode; give search.episodes >= 1")
        # apply the best configuration once more: its weights become best.pt, its values best.yaml
        again = env.evaluate_values(best["values"], best["actions"])
        if abs(again["accuracy"] - best["accuracy"]) > 1e-6:
            log.warning("best configuration re-evaluated at %.4f%% (searched: %.4f%%): evaluate/finetune are not "
                        "deterministic", again["accuracy"], best["accuracy"])
        torch.save(env.state_dict_copy(), run_dir / SearchResult.state_path.name)
        front = pareto_rows(env, rows, latency=pareto_latency)
    finally:
        env._restore()  # the caller's model leaves the search as it came in, even when interrupted
    out_spec = spec_with_values(spec.model_copy(update={"search": section}), env.all_params, env.with_followers(again["values"]))
    dump_spec(out_spec, run_dir / SearchResult.spec_path.name)
    result = SearchResult(best=best, spec=out_spec, run_dir=run_dir, episodes=rows, replayed_accuracy=again["accuracy"],
                          probes=probes)
    plot_search(rows, best, result.plot_path, title=f"{section.algorithm}, budget {section.budget.kind} <= {section.budget.max}")
    write_pareto(front, run_dir, (section.budget.kind, float(section.budget.max)))
    return result
