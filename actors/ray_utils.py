"""Connecting to Ray: an existing cluster when an address is given, else a fresh local one.

Facts this relies on (Ray 2.60):

- Plain ``ray.init()`` with no address silently attaches to any cluster found through
  ``$RAY_ADDRESS`` or ``/tmp/ray/ray_current_cluster`` (someone else's ``ray start``), so a local
  cluster is started with ``address="local"``, which always starts a new one owned by this process.
- Inside ``ray job submit`` the job's script gets ``$RAY_ADDRESS``; that is honoured.
- Token auth is on by default in 2.60. A cluster started in-process by ``ray.init`` handles its
  own token; attaching to a ``ray start`` head needs ``RAY_AUTH_MODE=token`` (set by the caller's
  environment, never here: credentials are not this module's business).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

log = logging.getLogger(__name__)

from pipeline.config import RunConfig

# one home for the default: the config's deadline for blocking Ray calls
DEFAULT_CONNECT_TIMEOUT_S = RunConfig.model_fields["call_timeout_s"].default


class RayTimeoutError(TimeoutError):
    """A Ray operation did not finish within its deadline."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local head's or a dashboard's listeners)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    include_dashboard: bool = False,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    **init_kwargs: Any,
) -> dict:
    """Make sure this process is connected to Ray and return ``ray.cluster_resources()``.

    - already connected: nothing changes (the first caller's choice wins);
    - ``address`` given (``"auto"``, ``"ray://..."``, ``"host:port"``): connect to it;
    - no address but ``$RAY_ADDRESS`` set (a Ray job): connect to that;
    - otherwise start a new local cluster (``address="local"``) with ``num_cpus`` (default: all).

    An explicit ``host:port`` / ``ray://host:port`` address is first probed with a TCP connect, so an
    unreachable one raises :class:`RayTimeoutError` after ``timeout_s`` instead of Ray's long retries.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = dict(init_kwargs)
    kwargs.setdefault("log_to_driver", True)
    if target == "local":
        kwargs.update(num_cpus=num_cpus, include_dashboard=include_dashboard)
        if include_dashboard and "dashboard_port" not in kwargs:
            # a free port, never the default 8265: Ray Train's placement-group cleaner asks the
            # state API whether its controller lives, and a second local cluster's dashboard on
            # 8265 answers "unknown actor", which removes a healthy run's placement group
            kwargs["dashboard_port"] = free_port()
        if object_store_memory is not None:
            kwargs["object_store_memory"] = object_store_memory
    elif num_cpus is not None or object_store_memory is not None:
        log.warning("ensure_ray: num_cpus/object_store_memory are ignored when connecting to %s", target)

    if target not in ("local", "auto"):
        _check_reachable(target, timeout_s)
    # ray.init must run on the calling thread: the processes it starts die with the thread that
    # started them (PR_SET_PDEATHSIG), so a watchdog thread would kill a local cluster on exit.
    ray.init(address=target, **kwargs)
    return ray.cluster_resources()


def _check_reachable(address: str, timeout_s: float) -> None:
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port; let ray.init interpret it
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayTimeoutError(f"Ray cluster at {address} not reachable within {timeout_s:.0f} s: {e}") from None
