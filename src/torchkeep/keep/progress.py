"""Where a run is inside its data, and the iteration that continues an interrupted epoch with
exactly the batches that were left, in the same order, without loading the skipped ones.

How: just before each epoch's iterator is built, the global RNG and every sampler generator are
recorded (``epoch_start``). Resuming at position *k* sets them back to that record, builds the
iterator (so the sampler draws the same order, and the loader the same base seed), lets a
pass-through index sampler drop the first *k* batches of indices — workers never see them — and
then sets the generators back to where the checkpoint left them, so that dropout and
augmentations continue the original stream.

Limits: map-style datasets only (an IterableDataset has no indices to skip); samplers must draw
their randomness when the epoch starts (all of torch's do) or from their own generator;
randomness drawn *inside* worker processes continues from the worker seed, not from where the
interrupted workers were.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from torchkeep.errors import StateError
from torchkeep.keep import rng


@dataclass
class LoaderProgress:
    """One DataLoader's place: the epoch, the batches handed out in it, and the generator states
    recorded when the epoch's iterator was built."""

    epoch: int = 0
    position: int = 0
    epoch_start: dict[str, Any] | None = None


class ResumableIndexSampler:
    """Stands in for a DataLoader's batch sampler (or sampler): it passes the original through,
    except for one resumed epoch, where it drops the batches already consumed by index."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._skip: int | None = None
        self._pending: _Skipping | None = None

    @property
    def inner(self) -> Any:
        return self._inner

    def skip_next(self, n: int) -> None:
        """Iterators made from now until :meth:`prime` start after the first ``n`` batches.

        (A DataLoader iterator may call ``iter()`` on its sampler more than once while it is
        built — the multi-process one does — and uses the last one.)
        """
        self._skip = n

    def prime(self) -> None:
        """Run the skip of the iterator in use now (the sampler draws its randomness) before the
        first batch is loaded, and go back to passing through."""
        pending, self._pending, self._skip = self._pending, None, None
        if pending is not None:
            pending.prime()

    def __iter__(self) -> Iterator[Any]:
        if self._skip is None:
            return iter(self._inner)
        it = _Skipping(iter(self._inner), self._skip)
        self._pending = it
        return it

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_skip", "_pending"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"ResumableIndexSampler({self._inner!r})"


class _Skipping:
    def __init__(self, it: Iterator[Any], skip: int) -> None:
        self._it = it
        self._skip: int | None = skip
        self._head: list[Any] = []

    def prime(self) -> None:
        if self._skip is None:
            return
        skip, self._skip = self._skip, None
        for _ in itertools.islice(self._it, skip):
            pass
        self._head = list(itertools.islice(self._it, 1))

    def __iter__(self) -> "_Skipping":
        return self

    def __next__(self) -> Any:
        self.prime()
        if self._head:
            return self._head.pop()
        return next(self._it)


def install(loader: DataLoader) -> ResumableIndexSampler | None:
    """Put a :class:`ResumableIndexSampler` in front of ``loader``'s index sampler (once).

    DataLoader forbids setting its samplers after construction for users; the pass-through
    keeps every attribute of the original reachable, and ``len(loader)`` unchanged. None for
    an IterableDataset (no indices).
    """
    if not isinstance(loader, DataLoader):
        raise StateError(f"dataloader must be a torch.utils.data.DataLoader, got {type(loader).__name__}",
                         entry="dataloader")
    if isinstance(loader.dataset, IterableDataset):
        return None
    attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    current = getattr(loader, attr)
    if isinstance(current, ResumableIndexSampler):
        return current
    wrapper = ResumableIndexSampler(current)
    object.__setattr__(loader, attr, wrapper)
    it = getattr(loader, "_iterator", None)  # persistent workers keep their first iterator
    if it is not None:
        it._index_sampler = wrapper
    return wrapper


def generators(loader: DataLoader) -> dict[str, torch.Generator]:
    """The generators that decide the loader's order, by where they sit."""
    out: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    bs = loader.batch_sampler
    bs = bs.inner if isinstance(bs, ResumableIndexSampler) else bs
    sampler = loader.sampler
    sampler = sampler.inner if isinstance(sampler, ResumableIndexSampler) else sampler
    for name, obj in (("loader", loader), ("sampler", sampler), ("batch_sampler", bs),
                      ("batch_sampler.sampler", getattr(bs, "sampler", None))):
        g = getattr(obj, "generator", None) if obj is not None else None
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen.add(id(g))
            out[name] = g
    return out


def generator_states(loader: DataLoader) -> dict[str, torch.Tensor]:
    return {name: g.get_state() for name, g in generators(loader).items()}


def set_generator_states(loader: DataLoader, states: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    gens = generators(loader)
    for name, state in states.items():
        g = gens.get(name)
        if g is None:
            if strict:
                raise StateError(f"the checkpoint holds the state of the loader's {name} generator, "
                                 f"but this DataLoader has no generator there", entry="dataloader",
                                 hint="build the DataLoader the way the checkpointed run did")
            continue
        g.set_state(state.to(torch.uint8))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell samplers that shuffle per epoch (DistributedSampler) which epoch it is."""
    seen: set[int] = set()
    for obj in (loader.sampler, loader.batch_sampler):
        obj = obj.inner if isinstance(obj, ResumableIndexSampler) else obj
        for o in (obj, getattr(obj, "sampler", None)):
            if o is not None and id(o) not in seen and callable(getattr(o, "set_epoch", None)):
                seen.add(id(o))
                o.set_epoch(epoch)


def epoch_start_record(loader: DataLoader) -> dict[str, Any]:
    return {"rng": rng.capture(devices=False), "generators": generator_states(loader)}


def begin_epoch(loader: DataLoader, progress: LoaderProgress, name: str) -> Iterator[Any]:
    """Build the loader's iterator for ``progress``: a fresh epoch at position 0, otherwise the
    rest of the interrupted epoch."""
    sampler = install(loader)
    if progress.position <= 0:
        progress.position = 0
        set_epoch(loader, progress.epoch)
        progress.epoch_start = epoch_start_record(loader)
        return iter(loader)
    if sampler is None:
        raise StateError(f"cannot resume inside an epoch of an IterableDataset (position "
                         f"{progress.position}): it has no indices to skip", entry=_where(name),
                         hint="save at epoch ends, or use a map-style dataset")
    if not progress.epoch_start:
        raise StateError(f"position {progress.position} inside epoch {progress.epoch} but no record of "
                         f"the generators at the start of that epoch", entry=_where(name),
                         hint="the position is set by TrainState.batches(); do not set it by hand")
    now_rng = rng.capture(devices=False)
    now_gens = generator_states(loader)
    try:
        rng.restore(progress.epoch_start["rng"])
        set_generator_states(loader, progress.epoch_start.get("generators", {}))
        set_epoch(loader, progress.epoch)
        sampler.skip_next(progress.position)
        try:
            it = iter(loader)
        finally:
            sampler.prime()
    finally:
        rng.restore(now_rng)
        set_generator_states(loader, now_gens, strict=False)
    return it


def _where(name: str) -> str:
    return f"dataloader.{name}" if name else "dataloader"
