"""Complete, atomic, asynchronously uploaded checkpoints on local disk or ``s3://``.

Layout under a stage's ``<stage dir>/checkpoints/`` (a contract: README "Checkpoints and resume")::

    step-00000012/
        policy/model.safetensors, policy/config.json     weights (read with safetensors only)
        deepspeed/<tag>/...                              each rank's DeepSpeed files (pickle: trusted buckets only)
        state.json                                       step, version, stage, data position, RNG, config, metrics
        ledger.json                                      sample ids learned at each step (the data position's detail)
        rank-00001.done                                  rank r>0: "my files are uploaded" (JSON manifest)
        COMMIT                                           written LAST: manifest {relpath: [size, sha256]}
    latest                                               name of the newest committed checkpoint

A reader only ever considers directories with a ``COMMIT`` marker, and :func:`resolve` verifies the
manifest (sizes and sha256 of every file) before it trusts one; a checkpoint that fails (corrupted,
truncated, files missing) is reported by name and the previous complete one is used. Object stores
have no rename, so "temporary name + commit" is "files first, marker last"; deletion goes the other
way (marker first), so a half-deleted checkpoint is never listed either.

:class:`CheckpointWriter` stages a checkpoint into a local directory in the caller's thread (the
learner's only stall: serialising a few MB) and uploads it in a background thread with retries and
exponential backoff. While an upload is in flight the newest pending snapshot replaces an older
pending one (counted as ``skipped``), so a slow or unreachable store never stalls training. Rank 0
commits once every rank's ``rank-<r>.done`` is present, then moves ``latest`` and applies the
retention policy (keep the last N plus the best by a metric).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import storage
from pipeline.config import CheckpointConfig, S3Config

log = logging.getLogger(__name__)

COMMIT, LATEST, STATE, LEDGER = "COMMIT", "latest", "state.json", "ledger.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (names it and says why)."""


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_of(local_dir: Path) -> dict[str, list]:
    """``{relpath: [size, sha256]}`` of every file under ``local_dir``."""
    return {p.relative_to(local_dir).as_posix(): [p.stat().st_size, _sha256(p)]
            for p in sorted(local_dir.rglob("*")) if p.is_file()}


def retry(fn: Callable[[], Any], what: str, attempts: int, backoff_s: float, max_backoff_s: float,
          on_retry: Callable[[], None] | None = None) -> Any:
    """``fn()`` with up to ``attempts`` tries, sleeping ``backoff_s * 2**k`` (capped) in between."""
    for k in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (network/storage errors of every kind)
            if k == attempts - 1:
                raise
            delay = min(max_backoff_s, backoff_s * 2**k)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(e).__name__, e, k + 1,
                        attempts - 1, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)


# ============================================================================================ read


@dataclass
class CheckpointRef:
    """A committed checkpoint: its URI, step and ``state.json``."""

    path: str
    step: int
    state: dict[str, Any] = field(default_factory=dict)


def _exists(path: str, s3: S3Config | None) -> bool:
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(path, s3)
    return fs.get_file_info(p).type == pafs.FileType.File


def list_committed(root: str, s3: S3Config | None = None) -> list[tuple[int, str]]:
    """``[(step, uri)]`` of checkpoints under ``root`` that have a COMMIT marker, oldest first."""
    out = []
    for f in storage.list_files(root, COMMIT, s3):
        parent = f[: -len(COMMIT)].rstrip("/")
        m = _NAME.match(parent.rsplit("/", 1)[-1])
        if m and f.endswith("/" + COMMIT):
            out.append((int(m.group(1)), parent))
    return sorted(out)


def verify(path: str, s3: S3Config | None = None) -> CheckpointRef:
    """Check a checkpoint against its COMMIT manifest; raise :class:`CheckpointError` naming it."""
    import pyarrow.fs as pafs

    try:
        commit = json.loads(storage.read_bytes(storage.join(path, COMMIT), s3))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMMIT} marker)") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {COMMIT} ({e})") from None
    fs, root = storage.filesystem(path, s3)
    for rel, (size, sha) in sorted(commit.get("files", {}).items()):
        info = fs.get_file_info(f"{root}/{rel}")
        if info.type != pafs.FileType.File:
            raise CheckpointError(f"checkpoint {path} is corrupted: {rel} is missing")
        if info.size != size:
            raise CheckpointError(f"checkpoint {path} is corrupted: {rel} has {info.size} bytes, expected {size}")
        data = storage.read_bytes(storage.join(path, rel), s3)
        if hashlib.sha256(data).hexdigest() != sha:
            raise CheckpointError(f"checkpoint {path} is corrupted: {rel} fails its sha256")
    try:
        state = json.loads(storage.read_bytes(storage.join(path, STATE), s3))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE} ({e})") from None
    return CheckpointRef(path=path, step=int(state["step"]), state=state)


def resolve(root: str, s3: S3Config | None = None, warn: Callable[[str], Any] | None = print) -> CheckpointRef | None:
    """The newest committed checkpoint under ``root`` that verifies, or None when there is none.
    Each one that fails is reported through ``warn`` (by name, with the reason) and skipped."""
    for _, path in reversed(list_committed(root, s3)):
        try:
            return verify(path, s3)
        except CheckpointError as e:
            if warn is not None:
                warn(f"WARNING: {e}; falling back to the previous complete checkpoint")
    return None


def latest_pointer(root: str, s3: S3Config | None = None) -> str | None:
    """What ``latest`` names (informational: :func:`resolve` trusts COMMIT markers, not this)."""
    try:
        return storage.read_bytes(storage.join(root, LATEST), s3).decode().strip() or None
    except (FileNotFoundError, OSError):
        return None


def download(ref: CheckpointRef | str, dest: Path, s3: S3Config | None = None) -> Path:
    """A local copy of a checkpoint (local checkpoints are used in place)."""
    path = ref.path if isinstance(ref, CheckpointRef) else ref
    return Path(path) if not storage.is_s3(path) else storage.download_dir(path, dest, s3)


def load_policy(ckpt_path: str, s3: S3Config | None = None) -> Any:
    """A checkpoint's policy (its ``policy/`` folder, local or ``s3://``, read with safetensors)."""
    from pipeline.policy import ScorePolicy

    return ScorePolicy.from_pretrained(storage.join(ckpt_path, "policy"), s3=s3)


def delete(path: str, s3: S3Config | None = None) -> None:
    """Remove a checkpoint: its COMMIT marker first, so it is never listed half-deleted."""
    fs, p = storage.filesystem(path, s3)
    try:
        fs.delete_file(f"{p}/{COMMIT}")
    except (FileNotFoundError, OSError):
        pass
    try:
        fs.delete_dir(p)
    except (FileNotFoundError, OSError):
        pass


# ============================================================================================ write


@dataclass
class _Job:
    step: int
    local: Path
    metric: float | None
    created: float


class CheckpointWriter:
    """Background uploader of one rank's checkpoint files (see module doc).

    ``save(step, local_dir, metric)`` takes ownership of ``local_dir`` (a staged checkpoint of this
    rank's files; rank 0's also holds ``state.json``) and returns at once. ``close()`` waits for
    the last upload. ``stats()``: ``uploads``, ``retries``, ``failures``, ``skipped``, ``last_upload_s``,
    ``last_committed``."""

    def __init__(self, root: str, cfg: CheckpointConfig, *, rank: int = 0, world: int = 1,
                 s3: S3Config | None = None, log_fn: Callable[[str], Any] | None = print):
        self.root, self.cfg, self.rank, self.world, self.s3 = root.rstrip("/"), cfg, rank, world, s3
        self.log = log_fn or (lambda _m: None)
        self._cv = threading.Condition()
        self._pending: _Job | None = None
        self._busy = False
        self._closed = False
        self._stats = {"uploads": 0, "retries": 0, "failures": 0, "skipped": 0, "last_upload_s": 0.0,
                       "last_committed": -1}
        self._best: dict[str, float] = {}  # checkpoint name -> metric, for the keep-best rule
        self._thread = threading.Thread(target=self._run, name=f"ckpt-upload-r{rank}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side
    def save(self, step: int, local_dir: Path, metric: float | None = None) -> None:
        job = _Job(int(step), Path(local_dir), metric, time.time())
        with self._cv:
            if self._closed:
                raise RuntimeError("CheckpointWriter is closed")
            if self._pending is not None:  # a newer snapshot supersedes one not yet started
                shutil.rmtree(self._pending.local, ignore_errors=True)
                self._stats["skipped"] += 1
            self._pending = job
            self._cv.notify_all()
        if not self.cfg.async_upload:
            self.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or uploading; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float | None = None) -> dict[str, Any]:
        self.wait(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(5.0)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return dict(self._stats)

    # ---------------------------------------------------------------- upload thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            t0 = time.perf_counter()
            try:
                self._upload(job)
                with self._cv:
                    self._stats["uploads"] += 1
                    self._stats["last_upload_s"] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001  (a lost checkpoint is logged; training goes on)
                with self._cv:
                    self._stats["failures"] += 1
                self.log(f"WARNING: checkpoint {checkpoint_name(job.step)} was not saved: {type(e).__name__}: {e}")
            finally:
                shutil.rmtree(job.local, ignore_errors=True)
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _bump_retries(self) -> None:
        with self._cv:
            self._stats["retries"] += 1

    def _put(self, dest: str, src: Path | bytes) -> None:
        data = src if isinstance(src, bytes) else src.read_bytes()
        c = self.cfg
        retry(lambda: storage.write_bytes(dest, data, self.s3), f"upload {dest}", c.upload_attempts,
              c.upload_backoff_s, c.upload_max_backoff_s, self._bump_retries)

    def _upload(self, job: _Job) -> None:
        name = checkpoint_name(job.step)
        dest = storage.join(self.root, name)
        manifest = manifest_of(job.local)
        for rel in manifest:
            self._put(storage.join(dest, rel), job.local / rel)
        if self.rank != 0:
            self._put(storage.join(dest, f"rank-{self.rank:05d}.done"), json.dumps(manifest).encode())
            return
        files = dict(manifest)
        for r in range(1, self.world):  # every rank's files must be up before the commit
            marker = storage.join(dest, f"rank-{r:05d}.done")
            deadline = time.monotonic() + self.cfg.commit_timeout_s
            while not _exists(marker, self.s3):
                if time.monotonic() > deadline:
                    raise CheckpointError(f"rank {r} did not upload its part of {dest} within "
                                          f"{self.cfg.commit_timeout_s:.0f} s; not committed")
                time.sleep(0.2)
            files.update(json.loads(storage.read_bytes(marker, self.s3)))
        commit = {"step": job.step, "files": files, "created": job.created, "metric": job.metric}
        self._put(storage.join(dest, COMMIT), json.dumps(commit, sort_keys=True).encode())
        self._put(storage.join(self.root, LATEST), (name + "\n").encode())
        with self._cv:
            self._stats["last_committed"] = job.step
        if job.metric is not None:
            self._best[name] = float(job.metric)
        self._retain()

    def _retain(self) -> None:
        """Keep the last ``keep_last`` committed checkpoints, the ``keep_best`` best by metric and
        those at multiples of ``keep_every`` steps."""
        listed = list_committed(self.root, self.s3)
        committed = [p for _, p in listed]
        for p in committed:  # metrics of checkpoints an earlier (resumed) run wrote
            n = p.rsplit("/", 1)[-1]
            if n not in self._best:
                try:
                    m = json.loads(storage.read_bytes(storage.join(p, COMMIT), self.s3)).get("metric")
                except Exception:  # noqa: BLE001  (unreadable: not a candidate for "best")
                    m = None
                if m is not None:
                    self._best[n] = float(m)
        keep = set(committed[-self.cfg.keep_last:]) if self.cfg.keep_last > 0 else set()
        scored = [(m, n) for n, m in self._best.items()]
        scored.sort(reverse=self.cfg.best_mode == "max")
        keep |= {storage.join(self.root, n) for _, n in scored[: self.cfg.keep_best]}
        if self.cfg.keep_every:
            keep |= {p for s, p in listed if (s + 1) % self.cfg.keep_every == 0}
        for p in committed:
            if p not in keep:
                delete(p, self.s3)
                self._best.pop(p.rsplit("/", 1)[-1], None)


def fresh_run(run_dir: str, force: bool, s3: S3Config | None = None) -> bool:
    """``--fresh``: refuse (``FileExistsError``) to start over a run that has outputs unless
    ``force``, which deletes them. Returns whether anything was deleted."""
    if not storage.exists(run_dir, s3):
        return False
    if not force:
        raise FileExistsError(f"run directory {run_dir} already exists; --fresh would overwrite it: "
                              f"add --force to delete it, or drop --fresh to resume it")
    storage.delete_tree(run_dir, s3)
    return True


def stage_local(prefix: str = "score-ckpt-") -> Path:
    """A fresh local staging directory for one checkpoint (handed to :meth:`CheckpointWriter.save`)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


__all__ = [
    "CheckpointError", "CheckpointRef", "CheckpointWriter", "checkpoint_name", "delete", "download", "fresh_run",
    "latest_pointer", "list_committed", "manifest_of", "resolve", "retry", "stage_local", "verify",
]


def ledger_key(epoch: Any, sample_id: Any) -> str:
    """A consumed sample in a stage's ledger: ``"<epoch>:<sample id>"`` (ids repeat across epochs)."""
    return f"{int(epoch)}:{sample_id}"


def consumed_by_epoch(ledger: list[dict[str, Any]]) -> dict[int, list[str]]:
    """``{epoch: [sample ids]}`` the learner took off the stream (learned or dropped-and-counted);
    a resumed stage skips exactly these."""
    out: dict[int, list[str]] = {}
    for entry in ledger:
        for key in list(entry.get("ids", [])) + list(entry.get("dropped", [])):
            e, sid = key.split(":", 1)
            out.setdefault(int(e), []).append(sid)
    return out


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states as JSON (restored by :func:`set_rng_state`)."""
    import base64
    import random

    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]]],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict[str, Any]) -> None:
    import base64
    import random

    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
