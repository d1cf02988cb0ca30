"""``evefx.upgrade.ray_backend``: play :class:`~evefx.upgrade.env.UpgradeEnv` episodes on Ray actors.

``search.backend: ray`` (or ``evefx search --backend ray``) keeps the agent in the calling process
and moves the environments, which do the expensive part (applying a configuration, fine-tuning,
evaluating), onto Ray actors: one actor per environment (``search.n_envs``), each holding one
``UpgradeEnv`` built by the same picklable factory ``SubprocVecEnv`` uses for ``n_envs > 1``.

* SB3 algorithms see a :class:`RayVecEnv`, a stable-baselines3 ``VecEnv`` with the semantics of
  ``SubprocVecEnv`` (auto-reset on done, ``terminal_observation`` in the info, per-env seeds).
* ``random`` search draws its actions up front, so its episodes are independent: they are spread
  over the actors (:meth:`RayVecEnv.evaluate_actions`) and recorded in episode order.

Where Ray runs: the address given (``RAY_ADDRESS`` or ``address=``, e.g. ``ray://head:10001`` or
``head:6379``), else the instance this process already started (``ray.init`` called before), else a
small local instance started here and shut down again by :meth:`RayVecEnv.close`. The model, the
``evaluate``/``finetune`` callbacks and their data are pickled to the workers, so on a cluster the
modules that define them (evefx, your code) must be installed on every node.

Ray is an optional extra: ``pip install 'evefx[ray]'``.

Example:
    >>> vec = RayVecEnv([_EnvFactory(gm, Accuracy(val), {})] * 2)
    >>> obs = vec.reset()  # shape (2, observation size)
    >>> obs, rewards, dones, infos = vec.step(np.zeros((2, 1), dtype=np.float32))
    >>> vec.close()
"""
from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from evefx.errors import EvefxError, SearchError
from evefx.upgrade.env import UpgradeEnv

__all__ = ["RayVecEnv", "import_ray", "connect"]

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE = 256 * 2**20
"""Object store of a local instance started here: it holds one pickled copy of the model and the
callbacks' data, shared by the actors; Ray spills to disk past it."""


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`SearchError` saying how to install it.

    Example:
        >>> ray = import_ray()
    """
    try:
        import ray
    except ImportError as e:
        raise SearchError("search.backend: ray needs Ray, which is not installed here; pip install 'evefx[ray]' "
                          "(or use backend: local, with search.n_envs > 1 for parallel episodes)") from e
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; True when this call started a local instance.

    ``address`` (default: ``RAY_ADDRESS``) connects to a running cluster; without one, an instance
    already initialised in this process is reused, else a local one is started with ``num_cpus``
    CPUs (at most the machine's), no dashboard and a modest object store.

    Example:
        >>> started = connect()          # local instance, one CPU per core
        >>> connect("ray://head:10001")  # a cluster (Ray Client)
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address is not None:
            ray.init(address=address)
            log.info("connected to the Ray cluster at %s", address)
            return False
        cpus = max(1, min(num_cpus or os.cpu_count() or 1, os.cpu_count() or 1))
        # address="local": a new instance even when a `ray start` on this machine (alive or dead)
        # left its address behind, which a bare ray.init() would try to join
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE)
        log.info("started a local Ray instance with %d CPUs", cpus)
        return True
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r} (RAY_ADDRESS / --ray-address)" if address else "a local Ray instance"
        raise SearchError(f"search.backend: ray: could not connect to {where}: {e}; start one with `ray start --head` "
                          "and give its address, or unset RAY_ADDRESS to start a local instance") from e


class _EnvWorker:
    """One environment inside a Ray actor. Its methods are the commands of ``SubprocVecEnv``'s
    worker, with the same semantics (SB3 2.x), plus whole episodes for random search."""

    def __init__(self, make_env: Callable[[], gym.Env]):
        self.reset_info: dict[str, Any] = {}
        try:
            self.env = make_env()
            self.error: Exception | None = None
        except Exception as e:  # a failed actor constructor reaches the driver only as "actor died"
            self.error = e

    def spaces(self) -> tuple[gym.Space, gym.Space]:
        if self.error is not None:
            raise self.error  # from a method, ray.get raises it with its own type (a SearchError stays one)
        return self.env.observation_space, self.env.action_space

    def reset(self, seed: int | None, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        maybe_options = {"options": options} if options else {}
        obs, self.reset_info = self.env.reset(seed=seed, **maybe_options)
        return obs, self.reset_info

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, dict[str, Any], dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        info["TimeLimit.truncated"] = truncated and not terminated
        if done:
            # as SubprocVecEnv: keep the last observation for the caller, start the next episode
            info["terminal_observation"] = obs
            obs, self.reset_info = self.env.reset()
        return obs, float(reward), done, info, self.reset_info

    def episode(self, actions: np.ndarray) -> dict[str, Any]:
        """A whole episode from its actions (one per eve parameter), as random search plays it."""
        env = self.env.unwrapped
        assert isinstance(env, UpgradeEnv), f"random search plays an UpgradeEnv (got {type(env).__name__})"
        return env.evaluate_values(env.values_from_actions(actions), actions.tolist())

    def get_attr(self, name: str) -> tuple[bool, Any]:
        try:
            return True, self.env.get_wrapper_attr(name)
        except AttributeError as e:  # raised again in the driver, where VecEnv.has_attr expects it
            return False, str(e)

    def set_attr(self, name: str, value: Any) -> None:
        setattr(self.env, name, value)

    def env_method(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def is_wrapped(self, wrapper_class: type[gym.Wrapper]) -> bool:
        from stable_baselines3.common.env_util import is_wrapped

        return is_wrapped(self.env, wrapper_class)

    def close(self) -> None:
        self.env.close()


class RayVecEnv(VecEnv):
    """A stable-baselines3 ``VecEnv`` whose environments live in Ray actors, one per ``env_fns`` entry.

    A drop-in for ``SubprocVecEnv``: same step/reset/seed semantics, so a search with the same seed
    and ``n_envs`` plays the same episodes on either. Each factory is pickled once into Ray's object
    store and called inside its actor. Actors ask for one CPU each, less when the cluster has fewer
    CPUs than environments (they then share cores rather than wait for ever).

    Args:
        env_fns: picklable callables that build an environment (e.g. ``search._EnvFactory``).
        address: a Ray cluster address (default: ``RAY_ADDRESS``, else a local instance; see :func:`connect`).
        num_cpus_per_env: CPUs each actor reserves (default: ``min(1, cluster CPUs / len(env_fns))``).

    Example:
        >>> from stable_baselines3 import TD3
        >>> vec = RayVecEnv([make_env] * 4, address="ray://head:10001")
        >>> TD3("MlpPolicy", vec).learn(1000); vec.close()
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], *, address: str | None = None,
                 num_cpus_per_env: float | None = None):
        if not env_fns:
            raise SearchError("search.n_envs: RayVecEnv needs at least one environment")
        ray = import_ray()
        self._ray = ray
        self.waiting = False
        self.closed = False
        self._pending: list[Any] = []
        self._owns_ray = connect(address, num_cpus=len(env_fns))
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            per_env = num_cpus_per_env if num_cpus_per_env is not None else min(1.0, cpus / len(env_fns))
            actor = ray.remote(num_cpus=per_env)(_EnvWorker)
            refs: dict[int, Any] = {}  # one object-store copy per distinct factory ([make_env] * n shares one)
            for fn in env_fns:
                if id(fn) not in refs:
                    try:
                        refs[id(fn)] = ray.put(fn)
                    except TypeError as e:
                        raise SearchError(f"search.backend: ray: the environment (model, evaluate, finetune) does not "
                                          f"pickle, so it cannot go to Ray workers: {e}") from e
            self.workers = [actor.remote(refs[id(fn)]) for fn in env_fns]
            observation_space, action_space = self._get(self.workers[0].spaces.remote())
            super().__init__(len(env_fns), observation_space, action_space)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ ray calls
    def _get(self, refs: Any) -> Any:
        """``ray.get`` with a worker's evefx errors raised as they are and a lost actor as a SearchError."""
        ray = self._ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, EvefxError):
                raise e.cause from None
            raise
        except ray.exceptions.RayActorError as e:
            raise SearchError(f"search.backend: ray: an environment's actor died ({e}); check the Ray logs "
                              "(out of memory?) and lower search.n_envs or add nodes") from e

    # ------------------------------------------------------------------ VecEnv
    def reset(self) -> VecEnvObs:
        refs = [w.reset.remote(self._seeds[i], self._options[i]) for i, w in enumerate(self.workers)]
        obs, self.reset_infos = zip(*self._get(refs))  # type: ignore[assignment]
        # seeds and options are used once, as in SB3's own vec envs
        self._reset_seeds()
        self._reset_options()
        return np.stack(obs)  # UpgradeEnv's observation space is a Box

    def step_async(self, actions: np.ndarray) -> None:
        self._pending = [w.step.remote(a) for w, a in zip(self.workers, actions, strict=True)]
        self.waiting = True

    def step_wait(self) -> VecEnvStepReturn:
        results = self._get(self._pending)
        self.waiting, self._pending = False, []
        obs, rewards, dones, infos, self.reset_infos = zip(*results)  # type: ignore[assignment]
        return np.stack(obs), np.stack(rewards), np.stack(dones), list(infos)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        ray = self._ray
        for w in getattr(self, "workers", []):
            try:
                ray.get(w.close.remote(), timeout=30)
            except Exception:  # an actor that already died has nothing left to close
                pass
            ray.kill(w)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()  # a local instance this object started goes with it

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        out = []
        for found, value in self._get([self.workers[i].get_attr.remote(attr_name) for i in self._get_indices(indices)]):
            if not found:
                raise AttributeError(value)
            out.append(value)
        return out

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._get([self.workers[i].set_attr.remote(attr_name, value) for i in self._get_indices(indices)])

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        return self._get([self.workers[i].env_method.remote(method_name, method_args, method_kwargs)
                          for i in self._get_indices(indices)])

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._get([self.workers[i].is_wrapped.remote(wrapper_class) for i in self._get_indices(indices)])

    # ------------------------------------------------------------------ random search
    def evaluate_actions(self, actions: Sequence[np.ndarray] | np.ndarray) -> Iterator[dict[str, Any]]:
        """Play one whole episode per row of ``actions`` (one action per eve parameter) on the actors;
        yield the :class:`~evefx.upgrade.env.EpisodeResult` of each, in row order.

        Episode ``k`` runs on actor ``k % num_envs``; at most two episodes wait per actor, so a
        stopped search leaves little work behind and the results arrive as they finish.

        Example:
            >>> for result in vec.evaluate_actions(np.random.uniform(-1, 1, (10, n_params))):
            ...     print(result["reward"])
        """
        pending: deque[Any] = deque()
        rows = iter(enumerate(actions))
        window = 2 * self.num_envs

        def submit() -> None:
            for k, a in rows:
                pending.append(self.workers[k % self.num_envs].episode.remote(np.asarray(a)))
                if len(pending) >= window:
                    return

        submit()
        while pending:
            result = self._get(pending.popleft())
            submit()
            yield result
