"""Shared fixtures: small real models and the torchkeep CLI as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SmallNet(torch.nn.Module):
    """Conv + BatchNorm + Linear: parameters, buffers and num_batches_tracked."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


@pytest.fixture
def small_net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


def run_cli(*args: str, cwd: str | None = None, check: bool = False, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    """Run ``python -m torchkeep ARGS`` and return the finished process (text output)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), COLUMNS="160")
    p = subprocess.run([sys.executable, "-m", "torchkeep", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchkeep {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def cli():
    return run_cli


def forked(fn, *args, quiet: bool = False) -> int:
    """Run ``fn(*args)`` in a forked child (the crash tests SIGKILL it): its exit code, or minus
    the signal that ended it. ``quiet`` silences warnings in the child."""
    import warnings

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with warnings.catch_warnings():
                if quiet:
                    warnings.simplefilter("ignore")
                fn(*args)
            code = 0
        except BaseException:  # noqa: BLE001 - report, exit with a failure code
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (the README run, real frameworks, DeepSpeed): with `pytest -n 2` they then
    run beside the many quick ones instead of being the tail of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
