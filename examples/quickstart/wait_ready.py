"""Waits until the openft server answers (the first `make run` installs for a few minutes).

Standard library only, so it runs before the virtual environment exists:
    python3 examples/quickstart/wait_ready.py
Reads OPENFT_BASE_URL (default http://127.0.0.1:8000/v1); gives up after 20 minutes.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request

base = os.environ.get("OPENFT_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")
health = base.removesuffix("/v1") + "/healthz"
deadline = time.monotonic() + 20 * 60
print(f"waiting for {health} ...", file=sys.stderr, flush=True)
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(health, timeout=2) as resp:
            if resp.status == 200:
                print("openft is up", file=sys.stderr)
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    time.sleep(2)
sys.exit(f"openft did not answer at {health} within 20 minutes; see the output of `make run`")
