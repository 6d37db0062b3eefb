"""Make ``pipeline``/``actors`` importable when a job runs as ``python jobs/x.py`` from a checkout
(e.g. in a Ray job's working dir) without the package being installed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
