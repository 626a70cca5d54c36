"""Environment columns recorded in every row: what ran, where, from which code."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _git(*args: str) -> str:
    try:
        p = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return p.stdout.strip() if p.returncode == 0 else ""


@functools.lru_cache(maxsize=None)
def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    # a copy of the tree without .git (e.g. a GPU machine) can name its commit in MOEBENCH_GIT_SHA
    head = _git("rev-parse", "HEAD")
    sha = os.environ.get("MOEBENCH_GIT_SHA") or head
    return {
        "gpu_name": torch.cuda.get_device_name(device) if cuda else "",
        "gpu_sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0,
        "driver": _driver() if cuda else "",
        "cuda_version": torch.version.cuda or "",
        "torch_version": torch.__version__,
        "cutlass_dsl_version": _version("nvidia-cutlass-dsl"),
        "quack_version": _version("quack-kernels"),
        "git_sha": sha,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if head else False,
        "host": socket.gethostname(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None),
    }
