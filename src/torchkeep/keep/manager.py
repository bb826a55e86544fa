"""``CheckpointManager``: the policy around checkpoints of a training run — when to save, which to
keep, which to resume from — on top of the native format (:mod:`torchkeep.read.formats.native`).

A save goes: capture the state and copy its tensors (the snapshot, in the caller's thread) →
write blobs, pack and manifest (:class:`~torchkeep.read.formats.native.NativeWriter`, in a background
thread when ``async_save``) → write the commit record → rotate. The checkpoint exists only once
its commit record does; rotation removes a checkpoint's commit record before its folder, and
deletes only blobs that no committed checkpoint refers to, so a crash at any point leaves every
kept checkpoint whole. The first save of a manager takes the folder's writer lock and collects
what a crashed writer left behind (uncommitted folders, temporary files, unreferenced blobs).
The write, fsync and rename order, the second copies of shared blobs and the checks a writer
makes before it trusts a file are in docs/ARCHITECTURE.md ("The checkpoint store under faults").

Multi-rank writers plug in at the same seams: every rank writes its part of the folder
(``Snapshot`` → ``writer.write``), then one rank calls ``native.commit`` and rotates.
"""
from __future__ import annotations

import builtins  # the method list() below shadows the type in annotations
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch

from torchkeep.errors import CorruptCheckpointError, StateError
from torchkeep.keep.commits import CommitEntry, plain_metrics, resolve_step
from torchkeep.keep.folderid import FolderIdentity
from torchkeep.keep.lifetime import FlushOnExit
from torchkeep.keep.readsnapshot import load_newest_good, mark_lost_records, still_committed
from torchkeep.keep.retention import CheckpointInfo, ranked_best, steps_to_keep
from torchkeep.keep.retention import tensor_signatures as _signatures
from torchkeep.keep.retention import unchanged_since as _unchanged
from torchkeep.keep.savefailure import guarded, watch
from torchkeep.keep.staging import Stager
from torchkeep.keep.trainstate import TrainState
from torchkeep.keep.writerstart import collect, take_lock
from torchkeep.read.formats import native
from torchkeep.read.formats.native import Snapshot
from torchkeep.store import typedjson as serial
from torchkeep.store.backends import storage_for
from torchkeep.store.blobs import BlobStore
from torchkeep.store.checksums import entry_token
from torchkeep.store.commitrecord import has_record

log = logging.getLogger(__name__)

Which = Literal["latest", "best"] | int


class CheckpointManager(FlushOnExit):
    """Saves training states into ``directory`` (a folder, or an fsspec URL such as ``memory://x``).

    ``keep_last`` newest and ``keep_best`` best (by ``metrics[monitor]``, ``mode`` 'min' or 'max')
    checkpoints are kept, the newest always; ``keep_last=None`` keeps all. ``should_save(step)``
    says whether ``every_steps`` / ``every_seconds`` ask for a save. With ``async_save`` a save
    returns once the state is copied to CPU memory and is written by a background thread (at most
    one pending). A failed background save frees its partial checkpoint at once and raises a
    :class:`~torchkeep.errors.SaveError` (step, file, cause) once: from the next ``save`` (after
    that save was started) or ``wait``/``close``; at interpreter exit it is logged at ERROR.
    Use it as a context manager to flush pending saves on exit and on SIGTERM/SIGINT.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int | None = 3, keep_best: int = 0,
                 monitor: str | None = None, mode: Literal["min", "max"] = "min",
                 every_steps: int | None = None, every_seconds: float | None = None,
                 async_save: bool = True) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best and not monitor:
            raise ValueError("keep_best needs monitor= (the metric that decides which is best)")
        if keep_last is not None and keep_last < 0:
            raise ValueError("keep_last must be >= 0 or None")
        self.directory = os.fspath(directory)
        self.storage, self.root = storage_for(self.directory)
        self.keep_last, self.keep_best = keep_last, keep_best
        self.monitor, self.mode = monitor, mode
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.async_save = async_save
        self.blobs = BlobStore(self.storage, self.storage.join(self.root, native.BLOB_DIR))
        self.writer = native.NativeWriter(self.storage, self.blobs)
        self._mutex = threading.RLock()
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None   # deletes what rotation dropped (sync saves)
        self._error: BaseException | None = None
        self._entries: dict[int, CommitEntry] | None = None   # the writer's view, from the first save on
        self._lock_cm: Any = None
        self._stager = Stager()  # host buffers of the snapshot, reused by every save
        # key -> (live tensor, version counter, blob digest, checksum token) of the last save
        self._prev: dict[str, tuple[torch.Tensor, int, str, str]] = {}
        self._identity: FolderIdentity | None = None
        self._last_save = time.monotonic()
        self._last_saved_step: int | None = None   # by step_done(): never the same step twice
        self._handlers: dict[int, Any] = {}
        self._closed = False
        # -- torchkeep.carry.migration.optimizer / torchkeep.keep.doctor.live: what the latest restore() migrated and found, and
        # the fingerprint of each save until its commit record is written -----------------------
        self.migration: Any = None     # migrate.MigrationReport of restore(migrate=...), else None
        self.findings: builtins.list[Any] = []  # doctor.Finding list of the latest restore()
        self._fingerprints: dict[int, dict[str, Any]] = {}
        # -------------------------------------------------------------------------------------------

    # -- policy ---------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True when ``step`` is a positive multiple of ``every_steps`` or ``every_seconds`` have
        passed since the last save; always True when neither is set."""
        if self.every_steps is None and self.every_seconds is None:
            return True
        if self.every_steps and step > 0 and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds is not None
                    and time.monotonic() - self._last_save >= self.every_seconds)

    def step_done(self, state: TrainState, metrics: Mapping[str, Any] | None = None) -> bool:
        """Call once per training step, after its update is applied: saves ``state`` when
        :meth:`should_save` says so, and at the last step of ``state.batches(max_steps=...)``.
        True when a save was started (asynchronous with ``async_save``)."""
        if not isinstance(state, TrainState):
            raise StateError(f"step_done() needs a TrainState (it counts the steps), got "
                             f"{type(state).__name__}", hint="call save(state, step=...) for a mapping")
        last = state.max_steps is not None and state.step >= state.max_steps
        if state.step == self._last_saved_step or not (last or self.should_save(state.step)):
            return False
        self.save(state, metrics=metrics)
        self._last_saved_step = state.step
        return True

    def _ranked_best(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        return ranked_best(infos, self.monitor, self.mode)

    def _keep(self, infos: list[CheckpointInfo]) -> set[int]:
        return steps_to_keep(infos, self.keep_last, self.keep_best, self.monitor, self.mode)

    # -- listing --------------------------------------------------------------------------
    def _info(self, step: int, folder: str) -> CheckpointInfo:
        try:
            rec = native.read_commit(self.storage, folder)
        except CorruptCheckpointError as e:
            if not has_record(self.storage, folder):  # removed by rotation while we read it
                return CheckpointInfo(step, folder, status="uncommitted")
            return CheckpointInfo(step, folder, status="damaged", problems=[e.detail])
        if rec is None:
            return CheckpointInfo(step, folder, status="uncommitted")
        metrics = rec.get("metrics") or {}
        try:
            metrics = serial.decode(metrics, lambda k, t: None)
        except StateError:
            pass
        return CheckpointInfo(step, folder, time=rec.get("created"), metrics=metrics,
                              nbytes=int(rec.get("nbytes", 0)), written=int(rec.get("written", 0)))

    def list(self, *, include_uncommitted: bool = False) -> builtins.list[CheckpointInfo]:
        """The checkpoints in the folder, oldest first (committed ones unless asked otherwise).
        Reads commit records only; :meth:`verify` checks the bytes."""
        out = []
        for name in self.storage.listdir(self.root):
            step = native.parse_step(name)
            if step is None:
                continue
            info = self._info(step, self.storage.join(self.root, name))
            if info.status == "ok" or include_uncommitted:
                out.append(info)
        return sorted(out, key=lambda i: i.step)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (not verified), or None."""
        infos = self.list()
        return infos[-1] if infos else None

    def best(self) -> CheckpointInfo | None:
        """The committed checkpoint with the best ``monitor`` metric, or None."""
        if not self.monitor:
            raise StateError("best() needs monitor= (the metric that decides which is best)")
        ranked = self._ranked_best(self.list())
        return ranked[0] if ranked else None

    def verify(self, *, deep: bool = False) -> builtins.list[CheckpointInfo]:
        """Every checkpoint with its status after reading all its bytes: 'ok', 'damaged' (with
        the problems) or 'uncommitted'. ``deep`` also checks each blob's sha256 against its name."""
        self.wait()
        out = []
        infos = self.list(include_uncommitted=True)
        newest = max((i.step for i in infos if i.status == "ok"), default=None)
        for info in infos:
            if info.status == "ok":
                older = info.step != newest
                problems = native.verify_folder(self.storage, info.path, deep=deep,
                                                copy_required=older)
                if problems:  # again: a save or rotation may have been between two writes
                    problems = native.verify_folder(self.storage, info.path, deep=deep,
                                                    copy_required=older)
                if problems and not still_committed(self.storage, info):
                    log.info("%s was removed (rotation) while it was verified", info.path)
                    continue
                if problems:
                    info.status = "damaged"
                    info.problems = [str(p) for p in problems]
            out.append(info)
        mark_lost_records(self.storage, out)
        return out

    # -- saving ---------------------------------------------------------------------------
    def save(self, state: TrainState | Mapping[str, Any], step: int | None = None,
             metrics: Mapping[str, Any] | None = None) -> None:
        """Checkpoint ``state`` at ``step`` (default: ``state.step``) with ``metrics``.

        Waits for the previous save (and raises its error, if it failed), snapshots the state in
        this thread, then writes it (in the background with ``async_save``). Saving a step that
        exists replaces that checkpoint.
        """
        self._check_open()
        # -- torchkeep.keep.sharded.checkpointing: inside a process group, or for a state with DTensors, every
        # rank writes its part and rank 0 commits (distributed.ShardedCheckpointing) -------------
        from torchkeep.keep.sharded import checkpointing as distributed
        if distributed.handles(self, state):
            return distributed.ShardedCheckpointing.of(self).save(state, step, metrics)
        # -----------------------------------------------------------------------------------------
        earlier = self._join()  # a failed previous save is raised once this one is under way
        try:
            self._save(state, step, metrics)
        except BaseException:
            if earlier is not None:
                log.error("%s", earlier)
            raise
        if earlier is not None:
            raise earlier

    def _save(self, state: TrainState | Mapping[str, Any], step: int | None,
              metrics: Mapping[str, Any] | None) -> None:
        step = resolve_step(state, step)
        self._begin_writing()
        if self._identity is not None:
            self._identity.check("save")
        # -- torchkeep.keep.doctor.live: the run's fingerprint, checked when a run resumes from here ---------
        if isinstance(state, TrainState):
            from torchkeep.keep.doctor import live as doctor
            with self._mutex:
                self._fingerprints[step] = doctor.record(state)
        # -------------------------------------------------------------------------------------------
        if isinstance(state, TrainState):
            tree, allow = state.capture(), state.allow_pickle
        else:
            tree, allow = dict(state), False
        enc = serial.encode(tree, allow_pickle=allow)
        try:
            plain = plain_metrics(metrics)
            mjson = serial.encode(plain).tree
        except StateError as e:
            raise StateError(f"metrics must be numbers or strings: {e.detail}", entry=e.entry) from None
        sigs = _signatures(enc.tensors)
        with self._mutex:
            hints = {k: prev[2:] for k, prev in self._prev.items()
                     if k in sigs and _unchanged(prev, sigs[k])}
        snap = self._snapshot(enc)
        job = (step, snap, mjson, plain, hints, sigs)
        self._launch(step, self._run_write, self._write, job)

    def _launch(self, step: int, in_background: Any, in_place: Any, job: tuple) -> None:
        """Run the write of ``step``: in the writer thread when saving asynchronously (the
        thread is remembered so the next save or wait() joins it), else right here."""
        self._last_save = time.monotonic()
        if self.async_save:
            t = threading.Thread(target=in_background, args=job, name=f"torchkeep-save-{step}",
                                 daemon=False)
            with self._mutex:
                self._thread = t
            t.start()
        else:
            in_place(*job)

    def _snapshot(self, enc: serial.Encoded) -> Snapshot:
        """CPU tensors that stay unchanged until written, complete before this returns: copies
        into reused staging buffers (pinned for CUDA tensors; see :mod:`torchkeep.keep.staging`),
        or the live CPU tensors of a synchronous save."""
        staged = self._stager.stage(enc.tensors, copy_cpu=self.async_save)
        return Snapshot(enc.tree, staged.tensors, staged.devices)

    def _run_write(self, *job: Any) -> None:
        try:
            self._write(*job)
        except BaseException as e:
            self._failed(job[0], e)

    def _failed(self, step: int, err: BaseException) -> None:
        """A background write failed: kept, and raised by the next save()/wait()."""
        log.debug("background save of step %d failed", step, exc_info=True)
        with self._mutex:
            self._error = err

    def _forget_step(self, step: int) -> None:
        """Drop ``step`` from the writer's view before its folder is replaced."""
        with self._mutex:
            assert self._entries is not None
            self._entries.pop(step, None)

    def _known_blobs(self) -> dict[str, str]:
        """Blob digest -> checksum token of every blob a kept checkpoint refers to."""
        known: dict[str, str] = {}
        with self._mutex:
            for e in (self._entries or {}).values():
                known.update(e.refs or {})
        return known

    def _committed(self, step: int, info: CheckpointInfo, blobs: dict[str, str],
                   unchanged: dict[str, Any] | None = None, *, defer: bool = False) -> None:
        """``step`` is committed: file it, remember what it wrote for the next save's
        unchanged-tensor test, then rotate (a failed rotation is logged and retried by the next
        save: the checkpoint itself is safe). ``defer``: delete the files of the checkpoints
        rotation drops in a background thread (see :meth:`_rotate`)."""
        with self._mutex:
            assert self._entries is not None
            self._entries[step] = CommitEntry(info, blobs)
            self._prev = unchanged or {}
        try:
            self._rotate(defer=defer)
        except Exception as e:  # noqa: BLE001
            log.error("step %d is saved, but rotation failed (%s); older checkpoints stay until "
                      "the next save retries", step, e)

    def _write(self, step: int, *rest: Any) -> None:
        """Write one checkpoint; on failure free its partial folder and new blobs at once and
        raise a SaveError naming the step, the file and the cause."""
        folder = self.storage.join(self.root, native.step_dirname(step))
        guarded(step, folder, lambda: self._write_checkpoint(step, *rest),
                lambda: self._free(step, folder), lambda: len(self._entries or {}))

    def _free(self, step: int, folder: str) -> None:
        with self._mutex:
            committed = step in (self._entries or {})
        if not committed:
            native.uncommit(self.storage, folder)
            self.storage.rmtree(folder)
        self._collect_blobs()

    def _write_checkpoint(self, step: int, snap: Snapshot, mjson: Any, plain: dict[str, Any],
                          hints: dict[str, tuple[str, str]] | None = None,
               sigs: dict[str, tuple[torch.Tensor, int]] | None = None) -> None:
        from torchkeep.version import __version__

        st = self.storage
        folder = st.join(self.root, native.step_dirname(step))
        self._forget_step(step)
        if st.exists(folder):
            native.uncommit(st, folder)
            st.rmtree(folder)
        known = self._known_blobs()
        created = time.time()
        meta = {"step": step, "created": created, "metrics": mjson, "torch": torch.__version__,
                "torchkeep": __version__}
        with self._mutex:
            self._prev = {}  # until this write succeeds, nothing is known to be unchanged
        res = self.writer.write(folder, snap, known=known, meta=meta, hints=hints)
        record = {"step": step, "created": created, "metrics": mjson,
                  "manifest_sha256": res.manifest_sha256, "nbytes": res.nbytes, "written": res.written}
        if self.monitor:  # lets `torchkeep ls` mark the best checkpoint as this manager ranks them
            record["monitor"] = {"metric": self.monitor, "mode": self.mode}
        with self._mutex:  # torchkeep.keep.doctor.live: the fingerprint goes into the commit record
            fingerprint = self._fingerprints.pop(step, None)
        if fingerprint is not None:
            record["doctor"] = fingerprint
        info = CheckpointInfo(step, folder, created, plain, res.nbytes, res.written)
        with self._mutex:  # what rotation keeps after this commit: lets verify tell a lost record
            infos = [e.info for e in (self._entries or {}).values()] + [info]
            record["kept"] = sorted(self._keep(infos))
        if self._identity is not None:
            self._identity.check("commit")
        native.commit(st, folder, record)
        unchanged = {k: (*sigs[k], e["blob"], entry_token(e)) for k, e in res.entries.items()
                     if e.get("blob") and sigs and k in sigs}
        log.debug("saved step %d: %d bytes, %d written", step, res.nbytes, res.written)
        self._committed(step, info, res.blobs, unchanged, defer=not self.async_save)

    def _rotate(self, *, defer: bool = False) -> None:
        """Delete checkpoints the policy does not keep: commit record first (from then on no
        reader counts them), then the folders and the blobs no remaining committed checkpoint
        refers to. With ``defer`` (a synchronous save) those deletions run in a background thread,
        so that the save returns once its checkpoint is committed; the next save, :meth:`wait`
        and :meth:`close` wait for them (space is freed before anything new is written)."""
        entries = self._entries
        assert entries is not None
        with self._mutex:
            keep = self._keep([e.info for e in entries.values()])
            drop = [s for s in entries if s not in keep]
        if drop and self._identity is not None:
            self._identity.check("rotate")
        folders = []
        for s in drop:
            folder = entries[s].info.path
            native.uncommit(self.storage, folder)
            with self._mutex:
                del entries[s]
            folders.append(folder)
        if not defer:
            self._delete(folders)
            return
        t = threading.Thread(target=self._delete, args=(folders, True), daemon=False,
                             name="torchkeep-rotate")
        with self._mutex:
            self._reaper = t
        t.start()

    def _delete(self, folders: builtins.list[str], background: bool = False) -> None:
        """Remove uncommitted ``folders``, then the blobs no committed checkpoint refers to
        (also what a replaced checkpoint of the same step held). A folder that is still there
        afterwards (rmtree ignores errors) is reported, not passed over."""
        try:
            for folder in folders:
                self.storage.rmtree(folder)
            self._collect_blobs()
            left = [f for f in folders if self.storage.exists(f)]
            if left:
                raise OSError(f"{', '.join(left)} could not be deleted (no longer checkpoints; the "
                              f"next writer to open this folder removes them)")
        except Exception as e:  # noqa: BLE001
            if not background:
                raise
            log.error("deleting the files of rotated checkpoints failed: %s", e)

    def _collect_blobs(self) -> None:
        entries = self._entries
        assert entries is not None
        with self._mutex:
            live: set[str] = set()
            for e in entries.values():
                live.update(e.refs or {})
        guard = self.writer.guard
        dead = (self.blobs.names() | guard.names()) - live
        guard.delete(dead)   # the second copy first: a copy never outlives its blob's refs
        for digest in dead:
            self.blobs.delete(digest)

    def _begin_writing(self) -> None:
        """On the first save: take the folder's writer lock, then collect what a crashed writer
        left (temporary files, uncommitted folders, blobs no committed checkpoint refers to)."""
        if self._entries is not None:
            return
        self._lock_cm = take_lock(self.storage, self.root)
        found, self._identity = collect(self.storage, self.root, self.blobs, self.writer.guard,
                                        self._info)
        entries = {step: CommitEntry(info, refs) for step, (info, refs) in found.items()}
        with self._mutex:
            self._entries = entries
        self._collect_blobs()
        watch(self)

    def wait(self) -> None:
        """Block until the pending save is written; raise its error (once) if it failed."""
        err = self._join()
        if err is not None:
            raise err

    def _join(self) -> BaseException | None:
        """Wait for the pending save; its error (taken: reported once), or None."""
        with self._mutex:
            t = self._thread
        if t is not None:
            t.join()
            with self._mutex:
                if self._thread is t:
                    self._thread = None
        with self._mutex:
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.join()
        with self._mutex:
            err, self._error = self._error, None
        return err

    # -- restoring ------------------------------------------------------------------------
    def _candidates(self, which: Which) -> builtins.list[CheckpointInfo]:
        infos = self.list()
        if which == "latest":
            return infos[::-1]
        if which == "best":
            if not self.monitor:
                raise StateError("restore(which='best') needs monitor=")
            return self._ranked_best(infos)
        if isinstance(which, int) and not isinstance(which, bool):
            found = [i for i in infos if i.step == which]
            if not found:
                raise StateError(f"no committed checkpoint at step {which}", entry=None,
                                 hint=f"steps: {', '.join(str(i.step) for i in infos) or 'none'}")
            return found
        raise ValueError(f"which must be 'latest', 'best' or a step, got {which!r}")

    def load(self, which: Which = "latest", *, trust: bool = False, verify: bool = True,
             allow_pickle: bool | None = None) -> tuple[int, dict[str, Any]] | None:
        """(step, state tree with tensors) of a checkpoint, verified; falls back to older good
        checkpoints like :meth:`restore`. None when there is none. ``trust`` unpickles values
        saved with ``TrainState(trust=True)`` (``allow_pickle`` is its deprecated alias)."""
        from torchkeep.keep.trainstate import pickle_opt_in

        got = self._load(which, pickle_opt_in(trust, allow_pickle, "CheckpointManager.load"), verify)
        return None if got is None else (got[0].step, got[1])

    def _load(self, which: Which, allow_pickle: bool, verify: bool = True
              ) -> tuple[CheckpointInfo, Any] | None:
        self.wait()
        return load_newest_good(self, which,
                                lambda info: self._read(info.path, allow_pickle, verify))

    def _read(self, folder: str, allow_pickle: bool, verify: bool = True) -> Any:
        manifest = native.read_manifest(self.storage, folder)
        # A module's tensors are only copied into its parameters: read them through memory maps.
        mapped = {k for k in manifest.get("tensors", {}) if k.startswith("model.")}
        tensors = native.load_tensors(self.storage, folder, manifest, mapped=mapped, verify=verify)

        def pickled(value: serial.PickledValue, path: str) -> Any:
            if not allow_pickle:
                raise StateError(f"holds a pickled {value.type_name}", entry=path,
                                 hint="create the TrainState with trust=True to unpickle it")
            return value.load()

        try:
            return serial.decode(manifest.get("state"), lambda k, tag: tensors[k], pickled=pickled)
        except KeyError as e:
            raise CorruptCheckpointError(f"the state refers to tensor {e} that the manifest lacks",
                                         path=folder) from None

    def restore(self, state: TrainState, which: Which = "latest", *, strict: bool = True,
                verify: bool = True,
                migrate: Any = False) -> int | None:
        """Load a checkpoint into ``state`` and return its step; None in a folder without one.

        Every tensor is checked against its checksum first, before anything is loaded into
        ``state`` (``verify=False`` skips the check: faster, and blind to damage). With
        ``which='latest'`` (or 'best'), a damaged checkpoint is skipped with a warning in favour
        of the next good one; a given step is never replaced by another.

        ``migrate=True`` (or a :class:`torchkeep.keep.migrating.Migration` with transfer options) restores
        into a model that changed since the save: weights through the transfer plan, optimizer
        state by parameter name; :attr:`migration` reports every tensor's and parameter's fate.
        The restored state is checked against the fingerprint saved with the checkpoint, now and
        at its first batch; :attr:`findings` and logged warnings name each divergence.
        """
        # -- torchkeep.keep.sharded.checkpointing: in a process group, for a state with DTensors, or when the
        # folder holds checkpoints written by ranks: every rank restores its part ----------------
        from torchkeep.keep.sharded import checkpointing as distributed
        if distributed.handles(self, state, restoring=True):
            return distributed.ShardedCheckpointing.of(self).restore(state, which, strict=strict)
        # -----------------------------------------------------------------------------------------
        got = self._load(which, state.allow_pickle, verify)
        if got is None:
            if isinstance(which, int):
                raise StateError(f"no committed checkpoint at step {which}")
            return None
        info, tree = got
        # -- torchkeep.carry.migration.optimizer / torchkeep.keep.doctor.live: a changed model restored by name; the restored
        # run checked against the checkpoint's fingerprint (now, and at its first batch) ---------
        from torchkeep.keep import migrating
        from torchkeep.keep.doctor import live as doctor
        if migrate:
            self.migration = migrating.restore_with_migration(state, tree, strict=strict,
                                                             options=migrate, step=info.step)
        else:
            state.restore(tree, strict=strict)
            self.migration = None
        try:
            recorded = (native.read_commit(self.storage, info.path) or {}).get("doctor")
        except CorruptCheckpointError:
            recorded = None
        self.findings = doctor.after_restore(state, recorded, info.step, migration=self.migration)
        # -------------------------------------------------------------------------------------------
        return info.step

    def doctor(self, state: TrainState) -> builtins.list[Any]:
        """Compare ``state`` now with the checkpoint :meth:`restore` restored it from: a list of
        :class:`torchkeep.keep.doctor.live.Finding` naming each divergence (empty when it matches).
        Call it just before the training loop."""
        from torchkeep.keep.doctor import live as doctor
        return doctor.check(state)

    # -- lifetime -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StateError("this CheckpointManager is closed")

    def close(self) -> None:
        """Finish the pending save, release the writer lock and the staging memory."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._stager.release()
            self._prev.clear()
            if self._lock_cm is not None:
                self._lock_cm.__exit__(None, None, None)
                self._lock_cm = None

    def __repr__(self) -> str:
        return (f"CheckpointManager({self.directory!r}, keep_last={self.keep_last}, "
                f"keep_best={self.keep_best}, async_save={self.async_save})")
