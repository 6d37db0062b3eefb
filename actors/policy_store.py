"""PolicyStore: a named Ray actor holding the newest policy weights of one stage, versioned.

The learner (rank 0) publishes version ``v+1`` after each update; rollout actors pull the newest
version between batches. Weights are small (the policy is a few MB at most), so they travel as a
plain ``{name: numpy array}`` dict through the object store.

The store also keeps the run's bookkeeping that must survive a rollout actor's restart: which
rollout batches were started (so a batch that a restarted actor processes again is counted as a
retry) and how many times.

It is also the staleness gate (:meth:`PolicyStore.try_admit`): a rollout actor asks before each
batch, and a batch is admitted only while the rows admitted so far stay below
``(updates + max_staleness + 1) * rows_per_version`` (plus what the learner's input path holds
back beyond that bound: ``actors.rollout.gate_slack_batches``), where ``updates`` counts the learner's
publishes since the stream started (a resumed stage counts from its checkpoint's version) and
``rows_per_version`` is what one learner update consumes (``batch_size * learner.num_workers``).
A batch admitted this way is consumed at most ``max_staleness`` versions after the version it
was rolled out with (when batches reach the learner in admission order).

    store = PolicyStore.options(name=store_name(run, stage)).remote()
    store.publish.remote(1, state_dict)      # numpy or torch values
    version, sd = ray.get(store.latest.remote())
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import ray


def store_name(run: str, stage: str) -> str:
    """Actor name of a stage's store (one per run and stage)."""
    return f"score-policy-store:{run}:{stage}"


def to_numpy_state(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` sharing memory with ``state_dict``'s CPU values (no copy). The store
    calls it on the arguments Ray deserialized for it - its own copy already - so a second copy
    would only cost time (about half of a publish for the larger policies)."""
    out: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        out[k] = v.detach().to("cpu").numpy() if hasattr(v, "detach") else np.asarray(v)
    return out


def to_torch_state(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Torch views of a state from ``ray.get`` (no copy): the arrays may be read-only views of the
    object store, so the tensors are for ``load_state_dict`` (which copies them into the
    parameters), never to be written."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}


@ray.remote(num_cpus=0, max_restarts=0)
class PolicyStore:
    """Versioned weights: ``version() == -1`` until the first publish."""

    def __init__(self) -> None:
        self._version = -1
        self._state: dict[str, np.ndarray] | None = None
        self._attempts: dict[str, int] = {}
        self._in_flight: dict[str, str] = {}
        self._done = 0
        self._actors: set[str] = set()
        self._retries = 0
        # staleness gate (try_admit)
        self._admitted: set[str] = set()
        self._admitted_rows = 0
        self._gate_base: int | None = None
        self._gate_refusals = 0
        self._gate_forced = 0

    # -------------------------------------------------------------- weights
    def publish(self, version: int, state_dict: Mapping[str, Any]) -> int:
        """Store ``state_dict`` as ``version`` (must not go backwards); returns the stored version."""
        version = int(version)
        if version < self._version:
            raise ValueError(f"publish: version {version} is older than the stored {self._version}")
        self._state = to_numpy_state(state_dict)
        self._version = version
        return version

    def version(self) -> int:
        return self._version

    def latest(self) -> tuple[int, dict[str, np.ndarray] | None]:
        return self._version, self._state

    def latest_if_newer(self, have: int) -> tuple[int, dict[str, np.ndarray] | None]:
        """``(version, state)`` when newer than ``have``, else ``(version, None)`` (no transfer)."""
        if self._version > int(have):
            return self._version, self._state
        return self._version, None

    # -------------------------------------------------------------- rollout batch bookkeeping
    def begin_batch(self, key: str, actor: str = "") -> int:
        """Record that a rollout batch started on ``actor``; returns its attempt number (1 = first try)."""
        n = self._attempts.get(key, 0) + 1
        self._attempts[key] = n
        self._in_flight[key] = actor
        self._actors.add(actor)
        if n > 1:
            self._retries += 1
        return n

    def try_admit(self, key: str, rows: int, max_staleness: int, rows_per_version: int,
                  slack_rows: int = 0, force: bool = False) -> tuple[bool, int]:
        """Staleness gate: may the rollout batch ``key`` of ``rows`` rows start now? True while
        ``admitted rows < (updates + max_staleness + 1) * rows_per_version + slack_rows`` (then its
        rows are counted), when ``key`` was admitted before (a retried batch is not counted twice)
        or with ``force`` (counted: the caller gave up waiting). ``updates`` = publishes since the
        first call (the version published before the stream starts - 0, ``--init-policy``'s 0 or
        a resumed checkpoint's - is the base); ``slack_rows``: rows the pipeline holds back between
        the pool and the learner that the learner needs before it can make its next update.
        Returns ``(admitted, current version)``."""
        if key in self._admitted:
            return True, self._version
        if self._gate_base is None:
            self._gate_base = max(self._version, 0)
        updates = max(0, self._version - self._gate_base)
        window = (updates + int(max_staleness) + 1) * max(1, int(rows_per_version)) + max(0, int(slack_rows))
        if self._admitted_rows < window or force:
            self._admitted.add(key)
            self._admitted_rows += int(rows)
            self._gate_forced += int(bool(force) and self._admitted_rows - int(rows) >= window)
            return True, self._version
        self._gate_refusals += 1
        return False, self._version

    def gate(self) -> dict[str, Any]:
        """The gate's counters: ``base`` version, ``admitted_rows``, ``admitted`` batches, ``refusals``
        (polls answered no), ``forced`` (batches that started after waiting too long)."""
        return {"base": self._gate_base, "admitted_rows": self._admitted_rows, "admitted": len(self._admitted),
                "refusals": self._gate_refusals, "forced": self._gate_forced}

    def end_batch(self, key: str) -> None:
        self._in_flight.pop(key, None)
        self._done += 1

    def in_flight(self) -> dict[str, str]:
        """``{batch key: actor}`` of rollout batches begun and not finished (a dead actor's stay
        here until its batch is retried and finishes)."""
        return dict(self._in_flight)

    def retries(self) -> int:
        return self._retries

    def stats(self) -> dict[str, Any]:
        return {"version": self._version, "batches": len(self._attempts), "retries": self._retries,
                "finished": self._done, "in_flight": len(self._in_flight), "actors": len(self._actors),
                "gate_admitted_rows": self._admitted_rows, "gate_refusals": self._gate_refusals,
                "gate_forced": self._gate_forced}


def get_store(name: str, timeout_s: float = 60.0) -> Any:
    """The named store actor (waits up to ``timeout_s`` for it to appear)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.monotonic() > deadline:
                from actors.ray_utils import RayTimeoutError

                raise RayTimeoutError(f"PolicyStore actor {name!r} not found within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def create_store(name: str) -> Any:
    """A fresh store named ``name`` (an existing one with that name, e.g. from an earlier failed
    attempt in the same cluster, is killed first)."""
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
    deadline = time.monotonic() + 30.0
    while True:
        try:
            return PolicyStore.options(name=name).remote()
        except ValueError:  # the killed actor's name is released asynchronously
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
