"""The README's quick start, run as printed: its bash block, line by line, in a copy of the
repository. Only the surroundings differ: a free port (``OPENFT_PORT`` / ``OPENFT_BASE_URL``), a
temporary home, and a ``.venv`` that is already "installed" (a shim onto the interpreter running
the tests), so ``make run`` skips the install that a fresh machine does first."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, model_cache

pytestmark = pytest.mark.slow


def readme_quickstart() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's quick start has no bash block"
    return block.group(1)


def installed_venv(root: Path) -> None:
    """A .venv whose python/openft run this interpreter; its install stamp is newer than pyproject."""
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, command in (
        ("python", f'exec "{sys.executable}" "$@"'),
        ("openft", f'exec "{sys.executable}" -m openft.cli.main "$@"'),
    ):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{command}\n")
        shim.chmod(0o755)
    (root / ".venv" / ".openft-installed").touch()


def test_readme_quick_start_runs_verbatim_and_the_model_learns(tmp_path):
    script = readme_quickstart()
    assert "make run &" in script and "quickstart.py" in script
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "examples", root / "examples")
    installed_venv(root)
    port = free_port()
    env = dict(
        os.environ,
        OPENFT_PORT=str(port),
        OPENFT_BASE_URL=f"http://127.0.0.1:{port}/v1",
        OPENFT_MODEL_CACHE=str(model_cache()),
    )
    env.pop("OPENFT_HOME", None)  # the README's default home: ./.openft in the repository
    env.pop("OPENFT_API_KEY", None)
    log = tmp_path / "quickstart.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=root,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # `make run &` and its server are in this group, stopped below
        )
        try:
            proc.wait(timeout=1800)  # a guard against hanging, not a speed assertion
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert (root / ".openft" / "openft.db").exists()
    assert "fine-tuned model: ft:openft-tiny-vlm:demo:quickstart:" in out
    assert re.search(r"Step (\d+)/\1: training loss=[0-9.]+, validation loss=", out), (
        out
    )  # followed to the end
    tally = re.search(r"right: base (\d+)/(\d+), fine-tuned (\d+)/(\d+)", out)
    assert tally, out
    base, n, tuned, _ = map(int, tally.groups())
    assert n == 16 and tuned >= 14 and base <= 4, out
