"""Test-wide settings: quiet, deterministic, small thread counts on the 2-core machines."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under the interpreter. It must be set before the
    # first `import triton` anywhere in the session (torch._dynamo imports it as a side effect).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA exists (the device tool); everything else always runs."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    keep = [it for it in items if "gpu" not in it.keywords]
    dropped = len(items) - len(keep)
    if dropped:
        config.hook.pytest_deselected(items=[it for it in items if "gpu" in it.keywords])
        items[:] = keep


@pytest.fixture
def python_exe() -> str:
    return sys.executable
