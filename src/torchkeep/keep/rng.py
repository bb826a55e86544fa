"""The global random number generators a training run draws from: Python's ``random``, numpy's
legacy global generator, torch's CPU generator and each initialized accelerator's generators."""
from __future__ import annotations

import logging
import random
from typing import Any

import torch

log = logging.getLogger(__name__)


def _numpy():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return numpy


def capture(devices: bool = True) -> dict[str, Any]:
    """Every global generator's state. CUDA generators are included when CUDA is initialized
    (a process that never touched CUDA has not drawn from them; asking would start CUDA)."""
    out: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = _numpy()
    if np is not None:
        out["numpy"] = np.random.get_state()
    if devices:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = list(torch.cuda.get_rng_state_all())
        mps = getattr(torch, "mps", None)
        if mps is not None and torch.backends.mps.is_available():
            out["mps"] = mps.get_rng_state()
    return out


def restore(state: dict[str, Any]) -> None:
    """Set the global generators to ``state`` (from :func:`capture`)."""
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "numpy" in state:
        np = _numpy()
        if np is None:  # pragma: no cover
            log.warning("numpy is not installed: its random state in the checkpoint is not restored")
        else:
            np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state:
        saved = state["cuda"]
        if not torch.cuda.is_available():
            log.warning("the checkpoint holds the RNG state of %d CUDA device(s) but CUDA is not "
                        "available: CUDA random draws will differ from the original run", len(saved))
        else:
            n = torch.cuda.device_count()
            if n != len(saved):
                log.warning("the checkpoint holds the RNG state of %d CUDA device(s), this process "
                            "sees %d: restoring the first %d", len(saved), n, min(n, len(saved)))
            for i in range(min(n, len(saved))):
                torch.cuda.set_rng_state(saved[i].to(torch.uint8), device=i)
    if "mps" in state:
        mps = getattr(torch, "mps", None)
        if mps is not None and torch.backends.mps.is_available():
            mps.set_rng_state(state["mps"].to(torch.uint8))
        else:
            log.warning("the checkpoint holds an MPS RNG state but MPS is not available")
