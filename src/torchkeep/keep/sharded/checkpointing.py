"""Training state across the ranks of a ``torch.distributed`` process group.

A :class:`~torchkeep.keep.manager.CheckpointManager` used inside a process group (or with a model
whose parameters are DTensors: FSDP2 ``fully_shard``, tensor parallel) saves and restores through
:class:`ShardedCheckpointing`:

* the model and optimizer state come from ``torch.distributed.checkpoint.state_dict``'s
  ``get_state_dict`` (canonical names: no ``module.``/``_orig_mod.`` prefixes, optimizer state
  keyed by parameter name), so a checkpoint restores whatever the wrapping and the number of ranks;
* DTensors (each rank's shards) are written by every rank through DCP's planner and
  ``FileSystemWriter`` into ``step-N/shards`` (``dcp.async_save`` when the manager saves
  asynchronously); tensors every rank holds alike (a DDP model, optimizer step counters, the
  scheduler, RNG, extras) are written once, by rank 0, in torchkeep's own format (deduplicated,
  xxh3 per tensor), and restored on every rank; each rank's RNG state is kept;
* the commit comes last: after DCP finished on every rank (its ``.metadata`` is written once all
  ranks' data is), every rank hashes its share of the shard files, rank 0 writes the manifest
  (with those xxh3-128 digests) and the commit record, then rotates. A rank killed mid-save leaves a folder
  without commit record, which restore never chooses and the next save removes;
* restore checks every candidate on all ranks (each rank verifies its share of the shard files)
  and agrees on the newest good one; DCP reshards on load, so 2 ranks' checkpoint restores on 1
  or on 3.

The rank helpers (:mod:`torchkeep.keep.sharded.ranks`) work without a process group (rank 0 of 1), so the
same training script runs under ``torchrun`` and as a plain process; the canonical form of the
model and optimizer is :mod:`torchkeep.keep.sharded.canonical`'s job. Both are re-exported here. DCP's
``.metadata`` is read without running code by :mod:`torchkeep.read.formats.dcpmeta`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from torchkeep.errors import CorruptCheckpointError, StateError
from torchkeep.keep.commits import plain_metrics, resolve_step
from torchkeep.keep.retention import CheckpointInfo
from torchkeep.keep.sharded.canonical import (LAYOUT, _as_dict, _canonical_parts, _detached,
                                              _optimizer_owners, _path, capture, has_dtensors)
from torchkeep.keep.sharded.ranks import (_dist, all_gather_object, barrier, broadcast_object,
                                          gather_object, is_distributed, is_dtensor, is_main,
                                          local_rank, rank, world_size)
from torchkeep.read.formats import native
from torchkeep.read.formats import nativeshards as sharded
from torchkeep.read.formats.dcp import METADATA as DCP_METADATA
from torchkeep.read.formats.dcpmeta import _safe_reader
from torchkeep.store import typedjson as serial

if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.keep.commits import CommitHost
    from torchkeep.keep.trainstate import TrainState

log = logging.getLogger(__name__)


# -- saving and restoring through a CheckpointManager --------------------------------------------

# Weak references only: a process group that outlives destroy_process_group() is destroyed at
# interpreter exit instead, when gloo's threads may abort the process ("terminate called without
# an active exception"). torch's own registry holds the checkpoint group; destroy_process_group()
# ends it with the others.
_GROUP: list[Any] = [None, None]   # weakrefs: [the default group it was made for, the checkpoint group]
_GROUP_LOCK = threading.Lock()


def checkpoint_group() -> Any:
    """The gloo group of checkpoint collectives (None with fewer than 2 ranks): made once per
    default process group, on the first call, which must happen on every rank (it is collective)."""
    if not is_distributed() or world_size() == 1:
        return None
    from torch.distributed.distributed_c10d import _get_default_group

    default = _get_default_group()
    with _GROUP_LOCK:
        made_for, group = (r() if r is not None else None for r in _GROUP)
        if made_for is not default or group is None:
            group = _dist().new_group(backend="gloo", group_desc="torchkeep_checkpoint")
            _GROUP[:] = [weakref.ref(default), weakref.ref(group)]
        return group


def handles(manager: "CommitHost", state: Any, *, restoring: bool = False) -> bool:
    """True when ``manager`` must save/restore ``state`` through :class:`ShardedCheckpointing`:
    inside a process group, for a state with DTensors, and (restoring) when the folder holds a
    checkpoint written by ranks."""
    if is_distributed() or has_dtensors(state):
        return True
    if restoring:
        for info in manager.list():
            with contextlib.suppress(CorruptCheckpointError, OSError, ValueError):
                rec = native.read_commit(manager.storage, info.path)
                if rec and rec.get(sharded.SECTION):
                    return True
    return False


class ShardedCheckpointing:
    """The save and restore of a :class:`~torchkeep.keep.manager.CheckpointManager` across ranks.

    Every rank calls :meth:`save` and :meth:`restore` at the same point of the run (they are
    collective). Checkpoint-side collectives run on a gloo group of their own, so that an
    asynchronous save's background thread never interleaves with the training's collectives.
    """

    def __init__(self, manager: "CommitHost") -> None:
        self.manager = manager

    @classmethod
    def of(cls, manager: "CommitHost") -> "ShardedCheckpointing":
        """The instance attached to ``manager`` (made on first use)."""
        inst = manager.__dict__.get("_sharded")
        if inst is None:
            inst = manager.__dict__["_sharded"] = cls(manager)
        return inst

    @property
    def group(self) -> Any:
        return checkpoint_group()

    def _agree(self, err: BaseException | None, what: str) -> None:
        """Raise on every rank if ``what`` failed on any (so that no rank goes on alone)."""
        msgs = all_gather_object(None if err is None else f"{type(err).__name__}: {err}", self.group)
        if err is not None:
            raise err
        for r, msg in enumerate(msgs):
            if msg:
                raise StateError(f"rank {r} failed to {what}: {msg}")

    # -- save ---------------------------------------------------------------------------------
    def save(self, state: "TrainState | Mapping[str, Any]", step: int | None = None,
             metrics: Mapping[str, Any] | None = None) -> None:
        from torchkeep.keep.trainstate import TrainState

        m = self.manager
        m._check_open()
        m.wait()
        step = resolve_step(state, step)
        W, me = world_size(), rank()
        group = self.group
        folder = m.storage.join(m.root, native.step_dirname(step))

        # Rank 0 readies the folder while every rank captures its state; one collective then
        # tells every rank whether all went well (before anyone writes) and brings the ranks'
        # RNG states to rank 0.
        err: BaseException | None = None
        if me == 0:
            try:
                self._prepare(step, folder)
            except BaseException as e:  # raised on every rank below
                err = e
        enc = mjson = None
        plain = plain_metrics(metrics)
        tree: dict[str, Any] = {}
        if err is None:
            try:
                if isinstance(state, TrainState):
                    tree, allow = capture(state), state.allow_pickle
                else:
                    tree, allow = dict(state), False
                    if sharded.SECTION in tree:
                        raise StateError(f"the key {sharded.SECTION!r} is reserved in a process group",
                                         entry=sharded.SECTION)
                enc = serial.encode(tree, allow_pickle=allow)
                mjson = serial.encode(plain).tree
            except StateError as e:
                err = e
        got = all_gather_object((None if err is None else f"{type(err).__name__}: {err}",
                                 tree.get("rng")), group)
        if err is not None:
            raise err
        for r, (msg, _) in enumerate(got):
            if msg:
                raise StateError(f"rank {r} failed to start the save of step {step}: {msg}")
        assert enc is not None
        if me == 0:  # every rank's RNG: a rank's dropout stream is its own
            sec = serial.encode({"world_size": W, "rng": [rng for _, rng in got]},
                                path=sharded.SECTION)
            enc.tree[sharded.SECTION] = sec.tree
            enc.tensors.update(sec.tensors)

        shards = {k: t for k, t in enc.tensors.items() if is_dtensor(t)}
        extra = {k: {"dtype": serial.dtype_name(t.dtype), "shape": list(t.shape), sharded.KEY: k,
                     "device": str(t.device)} for k, t in shards.items()}
        pending: Any = None
        if shards:
            pending = self._dcp_save(shards, sharded.location(m.storage, m.storage.join(folder, sharded.SHARDS)),
                                     m.async_save)
        snap = None
        if me == 0:
            snap = m._snapshot(serial.Encoded(enc.tree, {k: t for k, t in enc.tensors.items()
                                                         if k not in shards}))
        job = (step, folder, snap, extra, pending, mjson, plain)
        m._launch(step, self._run_finish, self._finish, job)

    def _prepare(self, step: int, folder: str) -> None:
        """Rank 0, before any rank writes: the manager's lock and clean-up, and no old folder
        of this step (its commit record goes first)."""
        m = self.manager
        m._begin_writing()
        m._forget_step(step)
        if m.storage.exists(folder):
            native.uncommit(m.storage, folder)
            m.storage.rmtree(folder)
        m.storage.makedirs(folder)

    def _dcp_save(self, shards: dict[str, Any], path: str, asynchronous: bool) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        if "://" in path:   # an object store: each object appears whole on upload; no fsync
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            writer: Any = FsspecWriter(path, single_file_per_rank=True, sync_files=False,
                                       thread_count=1, overwrite=True)
        else:
            writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True,
                                      thread_count=1, overwrite=True)
        # Replicated shards (a DTensor with Replicate placements) are written by the lowest rank.
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        no_dist = self.group is None
        if asynchronous:
            fut = dcp.async_save(shards, storage_writer=writer, planner=planner,
                                 process_group=self.group, no_dist=no_dist,
                                 async_stager=self._stager())
            return getattr(fut, "upload_completion", fut)
        return dcp.save(shards, storage_writer=writer, planner=planner, process_group=self.group,
                        no_dist=no_dist)

    def _stager(self) -> Any:
        """DCP's stager, kept for the manager's life: it copies each shard into the CPU buffer it
        used the last time (pinned when CUDA is there) instead of allocating every save."""
        stager = self.__dict__.get("_staging")
        if stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            stager = self.__dict__["_staging"] = DefaultStager(StagingOptions(
                use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                use_async_staging=False, use_non_blocking_copy=False))
        return stager

    def _run_finish(self, *job: Any) -> None:
        try:
            self._finish(*job)
        except BaseException as e:  # raised by the manager's next save()/wait()
            self.manager._failed(job[0], e)

    def _finish(self, step: int, folder: str, snap: Any, extra: dict[str, Any], pending: Any,
                mjson: Any, plain: dict[str, Any]) -> None:
        """After DCP: hash this rank's share of the shard files; rank 0 writes manifest and
        commit record and rotates; every rank learns whether that worked."""
        W, me = world_size(), rank()
        err: BaseException | None = None
        digests: dict[str, Any] = {}
        try:
            md = pending.result() if isinstance(pending, Future) else pending
            st = self.manager.storage
            local = st.local_path(folder)
            names = self._shard_files(md, folder, st) if extra else []
            for i, rel in enumerate(names):
                if i % W == me:
                    digests[rel] = (sharded.file_digest(os.path.join(local, rel)) if local is not None
                                    else sharded.file_digest(st.join(folder, rel), storage=st))
        except BaseException as e:
            err = e
        got = all_gather_object((None if err is None else f"{type(err).__name__}: {err}", digests),
                                self.group)
        failed = [(r, msg) for r, (msg, _) in enumerate(got) if msg]
        if err is None and not failed and me == 0:
            files: dict[str, Any] = {}
            for _, d in got:
                files.update(d)
            try:
                self._commit(step, folder, snap, extra, files, mjson, plain, W)
            except BaseException as e:
                err = e
        if failed and err is None:
            r, msg = failed[0]
            err = StateError(f"rank {r} failed to write its shards of step {step}: {msg}")
        self._agree(err, f"commit step {step}")

    @staticmethod
    def _shard_files(md: Any, folder: str, storage: Any) -> list[str]:
        rel = {f"{sharded.SHARDS}/{info.relative_path}"
               for info in getattr(md, "storage_data", {}).values()} if md is not None else set()
        if not rel:  # not told by DCP: take what is in the folder
            base = storage.join(folder, sharded.SHARDS)
            rel = {f"{sharded.SHARDS}/{n}" for n in storage.listdir(base) if n.endswith(".distcp")}
        rel.add(f"{sharded.SHARDS}/{DCP_METADATA}")
        return sorted(rel)

    def _commit(self, step: int, folder: str, snap: Any, extra: dict[str, Any],
                files: dict[str, Any], mjson: Any, plain: dict[str, Any], W: int) -> None:
        from torchkeep.version import __version__

        m = self.manager
        if extra:
            m.storage.sync_dir(m.storage.join(folder, sharded.SHARDS))
        known = m._known_blobs()
        created = time.time()
        section = {"world_size": W, "shards": sharded.SHARDS, "files": files}
        meta = {"step": step, "created": created, "metrics": mjson, "torch": torch.__version__,
                "torchkeep": __version__, sharded.SECTION: section}
        res = m.writer.write(folder, snap, known=known, meta=meta, extra_tensors=extra)
        shard_bytes = sum(int(f["size"]) for f in files.values())
        nbytes = res.nbytes + sum(serial.dtype_from_name(e["dtype"]).itemsize * _prod(e["shape"])
                                  for e in extra.values())
        record = {"step": step, "created": created, "metrics": mjson,
                  "manifest_sha256": res.manifest_sha256, "nbytes": nbytes,
                  "written": res.written + shard_bytes, sharded.SECTION: {"world_size": W}}
        native.commit(m.storage, folder, record)
        info = CheckpointInfo(step, folder, created, plain, nbytes, res.written + shard_bytes)
        log.debug("saved step %d from %d ranks: %d bytes", step, W, nbytes)
        m._committed(step, info, res.blobs)  # no "unchanged since the last save" hints here

    # -- restore ------------------------------------------------------------------------------
    def restore(self, state: "TrainState", which: Any = "latest", *, strict: bool = True) -> int | None:
        """Load the chosen checkpoint into ``state`` on every rank and return its step (None in
        a folder without one). A damaged candidate (on any rank) is skipped by all ranks alike
        in favour of the next good one; a given step is never replaced by another."""
        m = self.manager
        m.wait()
        group = self.group
        cands, err = None, None
        if rank() == 0:  # one listing, so that every rank considers the same checkpoints
            try:
                cands = m._candidates(which)
            except BaseException as e:
                err = e
        msg, cands = broadcast_object((None if err is None else f"{type(err).__name__}: {err}", cands),
                                      0, group)
        if err is not None:
            raise err
        if msg:
            raise StateError(f"rank 0 failed to list the checkpoints: {msg}")
        if not cands:
            if isinstance(which, int) and not isinstance(which, bool):
                raise StateError(f"no committed checkpoint at step {which}")
            return None
        problems = []
        for info in cands:
            got, problem = self._read(info.path, state.allow_pickle)
            seen = [p for p in all_gather_object(problem, group) if p]
            if seen:
                problems.append(seen[0])
                if isinstance(which, int) and not isinstance(which, bool):
                    raise CorruptCheckpointError(seen[0], path=info.path)
                log.warning("checkpoint %s is damaged (%s); trying an older one", info.path, seen[0])
                continue
            if problems:
                log.warning("resuming from %s instead of the damaged newer checkpoint(s)", info.path)
            kind, payload = got
            if kind == "regular":
                state.restore(payload, strict=strict)
            else:
                self._apply(state, info.path, *payload, strict=strict)
            return info.step
        raise CorruptCheckpointError(f"all {len(cands)} checkpoints are damaged; the newest: {problems[0]}",
                                     path=m.root, hint="torchkeep verify shows the details")

    def _read(self, folder: str, allow_pickle: bool) -> tuple[Any, str | None]:
        """This rank's checks of one candidate: the manifest, the tensors every rank reads (xxh3)
        and this rank's share of the shard files (xxh3-128). (kind, payload) or a problem."""
        m = self.manager
        try:
            rec = native.read_commit(m.storage, folder)
            if rec is None:
                return None, f"{folder}: not committed"
            manifest = native.read_manifest(m.storage, folder, rec)
            if not sharded.section(manifest):
                return ("regular", m._read(folder, allow_pickle)), None
            table = manifest.get("tensors", {})
            keys = [k for k, e in table.items() if not sharded.is_shard_entry(e)]
            tensors = native.load_tensors(m.storage, folder, manifest, keys)
            files = sorted(sharded.section(manifest).get("files") or {})
            bad = sharded.verify(m.storage, folder, manifest, files[rank()::world_size()])
            if bad:
                return None, str(bad[0])
            return ("canonical", (manifest, tensors)), None
        except CorruptCheckpointError as e:
            return None, str(e)

    def _apply(self, state: "TrainState", folder: str, manifest: dict[str, Any],
               tensors: dict[str, torch.Tensor], *, strict: bool) -> None:
        table = manifest.get("tensors", {})
        parts = _canonical_parts(state, restoring=True)
        targets = serial.encode(parts).tensors
        wanted = {k: e for k, e in table.items() if sharded.is_shard_entry(e)}
        problems = []
        for k, e in wanted.items():
            t = targets.get(k)
            if t is None:
                if strict:
                    problems.append(f"{k}: in the checkpoint, not in this state")
                continue
            if list(t.shape) != list(e["shape"]) or serial.dtype_name(t.dtype) != e["dtype"]:
                problems.append(f"{k}: the checkpoint has {e['dtype']} {list(e['shape'])}, this state "
                                f"{serial.dtype_name(t.dtype)} {list(t.shape)}")
        err = StateError("does not match the checkpoint: " + "; ".join(problems[:5]), path=folder,
                         hint="restore with strict=False to skip what does not fit"
                         ) if problems else None
        self._agree(err, "match the checkpoint")

        load = {k: targets[k] for k in wanted if k in targets}
        if load:
            import torch.distributed.checkpoint as dcp

            st = self.manager.storage
            shards = sharded.location(st, st.join(folder, sharded.section(manifest).get("shards", sharded.SHARDS)))
            with warnings.catch_warnings():  # one process on purpose: no need to say so
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(load, storage_reader=_safe_reader(shards), process_group=self.group,
                         no_dist=self.group is None)

        def tensor(key: str, tag: Mapping[str, Any]) -> Any:
            if key in load:
                return load[key]
            if key in tensors:
                t, tgt = tensors[key], targets.get(key)
                if is_dtensor(tgt) and not is_dtensor(t):  # written whole (DDP), restored sharded
                    from torch.distributed.tensor import distribute_tensor
                    t = distribute_tensor(t.to(tgt.device), tgt.device_mesh, tgt.placements,
                                          src_data_rank=None)
                return t
            if key in wanted:  # strict=False and this state has no such tensor
                return sharded.load(self.manager.storage, folder, manifest, [key])[key]
            raise CorruptCheckpointError("the state refers to a tensor the manifest does not list",
                                         path=folder, entry=key)

        def pickled(value: serial.PickledValue, path: str) -> Any:
            if not state.allow_pickle:
                raise StateError(f"holds a pickled {value.type_name}", entry=path,
                                 hint="create the TrainState with trust=True to unpickle it")
            return value.load()

        tree = serial.decode(manifest.get("state"), tensor, pickled=pickled)
        self._set_model_optimizer(state, tree, strict)
        rest = {k: v for k, v in tree.items() if k not in ("model", "optimizer", sharded.SECTION)}
        ranks_rng = (tree.get(sharded.SECTION) or {}).get("rng")
        me = rank()
        if isinstance(ranks_rng, list):
            saved_w = len(ranks_rng)
            if me < saved_w and ranks_rng[me] is not None:
                rest["rng"] = ranks_rng[me]
            else:
                rest.pop("rng", None)
            if saved_w != world_size() and me == 0:
                log.warning("%s was written by %d ranks, restored on %d: random streams continue "
                            "per rank where a rank existed; the run will not be bit-identical",
                            folder, saved_w, world_size())
        with _detached(state, "model", "optimizer"):
            state.restore(rest, strict=strict)

    def _set_model_optimizer(self, state: "TrainState", tree: Mapping[str, Any], strict: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(strict=strict)
        types_ = (tree.get("meta") or {}).get("types", {})
        for part in ("model", "optimizer"):
            items, stored = _as_dict(getattr(state, part)), tree.get(part)
            if stored is not None and not items and strict:
                raise StateError(f"the checkpoint holds a {part} but this TrainState has none",
                                 entry=part, hint="pass strict=False to restore the rest")
            if stored is None and items and strict:
                raise StateError(f"this TrainState has a {part} but the checkpoint holds none",
                                 entry=part, hint="pass strict=False to restore the rest")
        models = _as_dict(state.model)
        stored_models = _named(tree.get("model"), models, "model")
        for name, model in models.items():
            if name not in stored_models:
                continue
            try:
                set_model_state_dict(model, stored_models[name], options=opts)
            except (RuntimeError, ValueError, KeyError) as e:
                raise StateError(f"does not match the checkpoint: {str(e).strip()}",
                                 entry=_path("model", name)) from e
        owners = _optimizer_owners(state)
        stored_opts = _named(tree.get("optimizer"), owners, "optimizer")
        for name, (_, model, opt) in owners.items():
            if name not in stored_opts:
                continue
            path = _path("optimizer", name)
            want = types_.get(path)
            now = f"{type(opt).__module__}.{type(opt).__qualname__}"
            if want and want != now:
                raise StateError(f"the checkpoint holds a {want.rsplit('.', 1)[-1]}, this state has a "
                                 f"{type(opt).__name__}", entry=path)
            osd = stored_opts[name]
            try:
                set_optimizer_state_dict(model, opt, osd, options=opts)
            except (RuntimeError, ValueError, KeyError) as e:
                raise StateError(f"does not match the checkpoint: {str(e).strip()}", entry=path) from e
            if not osd.get("state"):
                opt.state.clear()  # saved before the first step: stay that way


def _named(stored: Any, live: Mapping[str, Any], part: str) -> dict[str, Any]:
    if stored is None:
        return {}
    if list(live) == [""] or not live:
        return {"": stored}
    if set(stored) != set(live):
        raise StateError(f"the checkpoint holds {part}s {sorted(stored)}, this TrainState has "
                         f"{sorted(live)}", entry=part)
    return dict(stored)


def _prod(xs: Any) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


# -- consolidation ------------------------------------------------------------------------------


__all__ = ["LAYOUT", "is_distributed", "rank", "world_size", "local_rank", "is_main", "barrier",
           "broadcast_object", "all_gather_object", "gather_object", "is_dtensor", "has_dtensors",
           "capture", "handles", "ShardedCheckpointing"]
