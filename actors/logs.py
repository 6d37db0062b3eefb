"""The console and the log files: what a user reads while a run goes, and where the rest goes.

A run's console carries the project's own lines only: each stage's progress line (with ETA and the
key figures; on a terminal it is redrawn in place, one line per stage), each stage's summary line,
the selection's result, the evaluation, and where things landed. Everything else a job prints
(Ray's and the libraries' notices, every actor's output) goes to the job's full log,
``<run>/logs/<job>.log`` (:func:`run_log_dir`), which the console names.

* :func:`plain` - a log line without terminal colours and without Ray's ``(Actor pid=N)`` prefix;
* :func:`for_console` - the text of a job-log line a user should see (a line tagged ``[<stage>]``,
  ``[select]``, ``[eval]``, ``[rollout ...]``, or an ``error:`` / ``WARNING:`` line), else None;
* :class:`Console` - prints lines; progress lines (:func:`pipeline.metrics.progress_tag`) are
  redrawn in place on a terminal and printed as they come to a pipe or a file.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import IO, Any, Iterable

from pipeline.metrics import progress_tag
from pipeline.trainer import STAGES

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Ray's prefix on a worker's line streamed to its driver: "(RayTrainWorker pid=12, ip=10.0.0.2) "
RAY_PREFIX = re.compile(r"^\((?P<who>[^\n]*?)\s?pid=\d+(?:, ip=[^)\s]+)?\)\s?")
# the tags of the project's own lines in a job's log
CONSOLE_TAGS = (*STAGES, "select", "eval", "rollout")
_TAG = re.compile(r"^\[(?P<tag>[A-Za-z_]+)[\] ]")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def plain(line: str) -> str:
    """``line`` without colour codes and without Ray's ``(Actor pid=N)`` prefix."""
    return RAY_PREFIX.sub("", strip_ansi(line), count=1).rstrip()


def for_console(line: str, tags: Iterable[str] = CONSOLE_TAGS) -> str | None:
    """The text of a job-log line for the console (see the module doc), else None."""
    text = plain(line)
    m = _TAG.match(text)
    if (m and m.group("tag") in tuple(tags)) or text.startswith(("error:", "WARNING:")):
        return text
    return None


def run_log_dir(run_dir: str, run: str) -> Path:
    """Where a run's log files go: ``<run dir>/logs`` (``runs/<run>/logs`` under the current
    directory when the run's storage is ``s3://``: log files are for a local reader)."""
    from pipeline import storage

    base = Path(run_dir) if not storage.is_s3(run_dir) else Path("runs", run).resolve()
    return base / "logs"


def shown_path(path: str | Path) -> str:
    """``path`` relative to the current directory when it is under it (shorter on a console);
    an ``s3://`` address as it is."""
    if "://" in str(path):
        return str(path)
    p = os.path.abspath(path)  # (not resolve(): a venv's python is a symlink out of the checkout)
    rel = os.path.relpath(p, os.getcwd())
    return rel if not rel.startswith("..") else str(path)


class Console:
    """A line printer for a user: progress lines (``[tag] step 3/60 ...``, ``[tag] 3/14 ...``, also
    behind a job log's ``  | ``) are redrawn in place on a terminal, so each stage shows one line
    that moves; every other line, and everything when the stream is not a terminal (a pipe, a
    file, a test), is printed as it comes. Call it like ``print`` with one string."""

    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None):
        self.stream = stream
        self.tty = tty
        self._open: str | None = None  # tag of the progress line drawn without its newline

    def _out(self) -> tuple[IO[str], bool]:
        stream = self.stream or sys.stdout  # at call time: pytest's capsys swaps sys.stdout
        tty = self.tty if self.tty is not None else bool(getattr(stream, "isatty", lambda: False)())
        return stream, tty

    def __call__(self, line: Any = "") -> None:
        stream, tty = self._out()
        text = str(line).rstrip("\n")
        tag = progress_tag(text) if tty and "\n" not in text else None
        if tag is not None:
            if self._open is not None and self._open != tag:
                stream.write("\n")
            width = shutil.get_terminal_size((120, 24)).columns
            stream.write("\r\x1b[K" + (text if len(text) < width else text[: width - 2] + "…"))
            self._open = tag
        else:
            self.close()
            stream.write(text + "\n")
        stream.flush()

    def close(self) -> None:
        """End a progress line drawn in place (it stays on screen)."""
        if self._open is not None:
            stream, _ = self._out()
            stream.write("\n")
            stream.flush()
            self._open = None


def quiet_train_worker(loop: Any, config: dict[str, Any]) -> Any:
    """Run a Ray Train worker loop (``functools.partial(quiet_train_worker, loop)`` is the trainer's
    ``train_loop_per_worker``) without Ray Train's per-report INFO line ``Reporting training result
    N: TrainingReport(checkpoint=None, metrics={...})`` in the job's log: Ray logs it through a
    logger named after its source file, which ``RunConfig(logging_config=...)`` does not reach."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray: its reports may be logged, nothing breaks
        pass
    return loop(config)
