"""One entry point for a fresh clone: set up a project-local environment, then run a job.

    python3 dev.py test        # install into .venv, then run the fast test suite
    python3 dev.py test-slow   # the tests that need the real SmolLM2 asset (fetched first) or a headless browser
                               # (Debian's chromium, installed with apt-get when absent and possible)
    python3 dev.py demo        # install, fetch the offline assets, run the main pipeline

Only the Python standard library is used here, so this works before anything is installed. The install is
redone only when pyproject.toml changes (a stamp file records its hash).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".sqsd-install-stamp"
# torch goes in first and pinned: on CPU machines a locally provided 2.13.0 wheel satisfies the package's own
# torch requirement, so pip does not pull a multi-GB CUDA build. GPU users install their torch before this.
TORCH = os.environ.get("SQSD_TORCH_SPEC", "torch==2.13.0")


def run(*cmd: str | os.PathLike) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def setup() -> None:
    """Create .venv and install torch, then this package with its dev extras (idempotent)."""
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    probe = subprocess.run([str(PY), "-c", "import torch"], capture_output=True)
    if probe.returncode != 0:
        run(*pip, TORCH)
    run(*pip, "-e", ".[dev]")
    STAMP.write_text(want)


def ensure_browser() -> None:
    """Install Debian's chromium for the report's browser test when no headless browser is on PATH and apt-get
    can (as root, or through sudo); otherwise say so, and that test skips."""
    if any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")):
        return
    sudo = [] if os.name == "posix" and os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        print("no headless browser and no apt-get (as root or via sudo): the report's browser test will skip")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, "apt-get", "update", "-q"], [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                                                     "chromium"]):
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            print("could not install chromium: the report's browser test will skip")
            return


def main(argv: list[str]) -> int:
    jobs = {
        "test": [[PY, "-m", "pytest", "-n", "2", "-q", *argv[1:]]],
        "test-slow": [
            [PY, "-m", "sqsd", "assets", "fetch"],
            [PY, "-m", "pytest", "-m", "slow", "-q", *argv[1:]],
        ],
        # The furthest stages that exist so far; becomes the full offline pipeline with the scorer.
        "demo": [
            [PY, "-m", "sqsd", "demo"],
        ],
        "setup": [],
    }
    if not argv or argv[0] not in jobs:
        print(__doc__)
        return 2
    setup()
    if argv[0] == "test-slow":
        ensure_browser()
    for cmd in jobs[argv[0]]:
        code = subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
