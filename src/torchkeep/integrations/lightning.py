"""Lightning: every checkpoint the Trainer asks for, written in torchkeep's format.

::

    from torchkeep.integrations.lightning import TorchkeepCheckpointIO

    trainer = Trainer(plugins=[TorchkeepCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
    trainer.fit(model, ckpt_path="last")

Each path Lightning names (``epoch=3-step=400.ckpt``, ``last.ckpt``) becomes a native checkpoint
*folder*: tensors in safetensors with an xxh3 checksum each, everything else in typed JSON (no pickle), a
manifest and a commit record written last. Tensors of 64 KiB and more go to ``blobs/`` next to
those folders, named by the xxh3-128 of their bytes, so a frozen backbone is stored once however many
checkpoints hold it; :meth:`~TorchkeepCheckpointIO.remove_checkpoint` (ModelCheckpoint's top-k
rotation) deletes the commit record first and then only blobs no committed checkpoint uses.

Saving a path again (``last.ckpt``) removes its commit record first and rewrites it in place, so
the folder never disappears; a load of a ``last*`` checkpoint that is uncommitted or fails its
checksums warns and falls back to the newest good checkpoint of the same folder (the top-k
checkpoint ModelCheckpoint wrote at the same step, or an older one). Other paths that fail
raise :class:`~torchkeep.errors.CorruptCheckpointError`.

On object storage Lightning cannot find ``ckpt_path="last"`` by itself (it compares modification
times, which a "folder" of objects does not have): pass ``ckpt_path=last_checkpoint(dirpath)``.

``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` and does not go through
the plugin: :func:`load_from_checkpoint` (``load_from_checkpoint(MyModel, "ckpt/last.ckpt")``)
reads the folder, verified, and hands Lightning the same dictionary.

Values typed JSON cannot hold (an object in ``hyper_parameters``) raise StateError naming the
key; ``trust=True`` (or a list of top-level keys, e.g. ``["hyper_parameters"]``) pickles
them instead, and unpickles them on load (which runs code from the checkpoint: the same opt-in
``torchkeep.open`` and the CLI's ``--trust`` use; ``allow_pickle`` is its deprecated alias).
``async_save=True`` copies the tensors in the caller's thread and writes in a background thread
(one at a time; an error is raised by the next call or at teardown); wrapped in Lightning's
``AsyncCheckpointIO`` it works as well.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

try:
    from lightning.fabric.plugins import CheckpointIO
except ImportError:  # pragma: no cover - the standalone package
    from lightning_fabric.plugins import CheckpointIO  # type: ignore[no-redef]

from torchkeep.errors import CorruptCheckpointError, StateError
from torchkeep.keep.trainstate import pickle_opt_in
from torchkeep.read.formats import native
from torchkeep.store import typedjson as serial
from torchkeep.store.backends import Storage, storage_for
from torchkeep.store.blobs import BlobStore
from torchkeep.store.files import is_tmp

log = logging.getLogger(__name__)


def _plain(obj: Any) -> Any:
    """Lightning's dict subclasses (AttributeDict of hyper_parameters) as plain dicts."""
    if type(obj) is dict or (isinstance(obj, dict) and type(obj).__name__ == "AttributeDict"):
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) is list:
        return [_plain(v) for v in obj]
    return obj


def _cpu(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        return t.to("cpu").contiguous()
    t = t.contiguous()
    return t.clone() if copy else t


class TorchkeepCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` writing torchkeep checkpoint folders (see the module doc)."""

    def __init__(self, *, trust: bool | Iterable[str] = False, async_save: bool = False,
                 verify: bool = True, allow_pickle: bool | Iterable[str] | None = None) -> None:
        trust = pickle_opt_in(trust, allow_pickle, "TorchkeepCheckpointIO")
        self.trust = trust if isinstance(trust, bool) else frozenset(trust)
        self.async_save = async_save
        self.verify = verify
        self._lock = threading.RLock()     # saves and removals of one folder, one at a time
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._refs: dict[str, dict[str, dict[str, int]]] = {}   # root -> folder -> blob refs

    # -- saving ---------------------------------------------------------------------------------
    def _pickle_ok(self, key: str) -> bool:
        return self.trust if isinstance(self.trust, bool) else key in self.trust

    def _encode(self, checkpoint: Mapping[str, Any]) -> serial.Encoded:
        tree: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for key, value in checkpoint.items():
            if not isinstance(key, str):
                raise StateError(f"checkpoint keys must be strings, got {key!r}", entry=repr(key))
            try:
                enc = serial.encode(_plain(value), allow_pickle=self._pickle_ok(key), path=key)
            except StateError as e:
                if not (e.hint and "trust=" in e.hint):
                    raise
                raise StateError(e.detail, entry=e.entry,
                                 hint=f"store plain values there, or pass TorchkeepCheckpointIO("
                                      f"trust=[{key!r}]) to pickle what is under {key!r}") from None
            tree[key] = enc.tree
            tensors.update(enc.tensors)
        return serial.Encoded(tree, tensors)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"TorchkeepCheckpointIO takes no storage_options (got {storage_options!r})")
        self._raise_pending_error()
        enc = self._encode(checkpoint)
        snap = native.Snapshot(enc.tree, {k: _cpu(t, self.async_save) for k, t in enc.tensors.items()})
        meta = {"step": int(checkpoint.get("global_step") or 0),
                "epoch": checkpoint.get("epoch"), "lightning": checkpoint.get("pytorch-lightning_version")}
        path = os.fspath(path)
        if self.async_save:
            self.wait()
            self._executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="torchkeep-lightning")
            self._pending = self._executor.submit(self._write, path, snap, meta)
        else:
            self._write(path, snap, meta)

    def _write(self, path: str, snap: native.Snapshot, meta: dict[str, Any]) -> None:
        from torchkeep.version import __version__

        storage, folder = storage_for(path)
        root = storage.join(*folder.rstrip("/").rsplit("/", 1)[:-1]) if "/" in folder else "."
        with self._lock:
            refs = self._folder_refs(storage, root)
            refs.pop(folder, None)
            native.uncommit(storage, folder)   # from here on, this path is not a checkpoint
            known: dict[str, int] = {}
            for r in refs.values():
                known.update(r)
            blobs = BlobStore(storage, storage.join(root, native.BLOB_DIR))
            created = time.time()
            res = native.NativeWriter(storage, blobs).write(
                folder, snap, known=known, meta={**meta, "created": created, "torch": torch.__version__,
                                                 "torchkeep": __version__, "source": "lightning"})
            native.commit(storage, folder, {
                "step": meta["step"], "created": created, "metrics": {"epoch": meta.get("epoch")},
                "manifest_sha256": res.manifest_sha256, "nbytes": res.nbytes, "written": res.written})
            refs[folder] = res.blobs
        log.debug("saved %s: %d bytes, %d written", path, res.nbytes, res.written)

    def _folder_refs(self, storage: Storage, root: str) -> dict[str, dict[str, int]]:
        """Blob references of every committed checkpoint folder in ``root`` (read once)."""
        refs = self._refs.get(root)
        if refs is None:
            refs = {}
            for name in storage.listdir(root):
                sub = storage.join(root, name)
                if is_tmp(name) or name == native.BLOB_DIR or not storage.exists(storage.join(sub, native.COMMIT)):
                    continue
                refs[sub] = native.manifest_blob_refs(storage, sub) or {}
            self._refs[root] = refs
        return refs

    # -- removing -------------------------------------------------------------------------------
    def remove_checkpoint(self, path: Any) -> None:
        """Delete a checkpoint: its commit record, its folder, then blobs no other uses."""
        path = os.fspath(path)
        if self.async_save and self._executor is not None:
            self._pending_remove(path)
            return
        self._remove(path)

    def _pending_remove(self, path: str) -> None:
        self.wait()
        assert self._executor is not None
        self._pending = self._executor.submit(self._remove, path)

    def _remove(self, path: str) -> None:
        storage, folder = storage_for(path)
        root = storage.join(*folder.rstrip("/").rsplit("/", 1)[:-1]) if "/" in folder else "."
        with self._lock:
            refs = self._folder_refs(storage, root)
            if not storage.isdir(folder):   # not ours (a file another plugin wrote)
                storage.remove(folder)
                return
            native.uncommit(storage, folder)
            refs.pop(folder, None)
            storage.rmtree(folder)
            live: set[str] = set()
            for r in refs.values():
                live.update(r)
            blobs = BlobStore(storage, storage.join(root, native.BLOB_DIR))
            for digest in blobs.names() - live:
                blobs.delete(digest)

    # -- loading --------------------------------------------------------------------------------
    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        self.wait()
        path = os.fspath(path)
        storage, folder = storage_for(path)
        try:
            tree = self._read(storage, folder)
        except CorruptCheckpointError as e:
            name = folder.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("last"):
                raise
            tree = self._fall_back(storage, folder, e)
        return self._to(tree, map_location)

    def _read(self, storage: Storage, folder: str) -> dict[str, Any]:
        if not storage.isdir(folder):
            raise CorruptCheckpointError("not a torchkeep checkpoint folder (missing, or a file "
                                         "another CheckpointIO wrote)", path=folder)
        if self.verify:
            bad = native.verify_folder(storage, folder)
            if bad:
                raise CorruptCheckpointError(str(bad[0]), path=folder,
                                             hint="torchkeep verify shows every problem")
        manifest = native.read_manifest(storage, folder)
        tensors = native.load_tensors(storage, folder, manifest, verify=False)

        def pickled(value: serial.PickledValue, where: str) -> Any:
            if not self._pickle_ok(where.split(".", 1)[0].split("[", 1)[0]):
                raise StateError(f"holds a pickled {value.type_name}", entry=where,
                                 hint="TorchkeepCheckpointIO(trust=...) to unpickle it "
                                      "(runs code from the checkpoint)")
            return value.load()

        return serial.decode(manifest.get("state"), lambda k, tag: tensors[k], pickled=pickled)

    def _fall_back(self, storage: Storage, folder: str, err: CorruptCheckpointError) -> dict[str, Any]:
        """The newest other committed checkpoint of the folder that reads back whole."""
        root = storage.join(*folder.rstrip("/").rsplit("/", 1)[:-1]) if "/" in folder else "."
        cands = []
        for name in storage.listdir(root):
            sub = storage.join(root, name)
            if sub.rstrip("/") == folder.rstrip("/") or is_tmp(name) or name == native.BLOB_DIR:
                continue
            try:
                rec = native.read_commit(storage, sub)
            except CorruptCheckpointError:
                continue
            if rec is not None:
                cands.append((int(rec.get("step") or 0), float(rec.get("created") or 0), sub))
        for _, _, sub in sorted(cands, reverse=True):
            try:
                tree = self._read(storage, sub)
            except CorruptCheckpointError as e2:
                warnings.warn(f"torchkeep: {sub} is damaged too ({e2.detail}); trying an older one",
                              stacklevel=3)
                continue
            warnings.warn(f"torchkeep: {folder} cannot be resumed from ({err.detail}); resuming from "
                          f"{sub} instead", stacklevel=3)
            return tree
        raise CorruptCheckpointError(f"{err.detail}; and no other good checkpoint in {root}",
                                     path=folder) from err

    @staticmethod
    def _to(tree: Any, map_location: Any) -> Any:
        if map_location is None or callable(map_location) or isinstance(map_location, dict):
            return tree   # CPU tensors; Lightning moves what it restores to its devices
        device = torch.device(map_location)

        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            if isinstance(x, tuple):
                return tuple(move(v) for v in x)
            return x
        return move(tree)

    # -- lifetime -------------------------------------------------------------------------------
    def _raise_pending_error(self) -> None:
        f = self._pending
        if f is not None and f.done():
            self._pending = None
            f.result()

    def wait(self) -> None:
        """Block until the pending background write is done; raise its error if it failed."""
        f, self._pending = self._pending, None
        if f is not None:
            f.result()

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def last_checkpoint(dirpath: Any) -> str | None:
    """The newest committed ``last*`` checkpoint of a ModelCheckpoint folder (a local folder or a
    URL), else the newest committed one, for ``trainer.fit(ckpt_path=...)``; None when there is
    none. By commit records only: loading it verifies the bytes and falls back if need be."""
    storage, root = storage_for(os.fspath(dirpath))
    found = []
    for name in storage.listdir(root):
        if is_tmp(name) or name == native.BLOB_DIR:
            continue
        sub = storage.join(root, name)
        try:
            rec = native.read_commit(storage, sub)
        except CorruptCheckpointError as e:
            warnings.warn(f"torchkeep: skipping {sub}: {e.detail}", stacklevel=2)
            continue
        if rec is not None:
            found.append((name.startswith("last"), int(rec.get("step") or 0),
                          float(rec.get("created") or 0), sub))
    if not found:
        return None
    path = max(found)[3]
    url_of = getattr(storage, "url_of", None)
    return url_of(path) if url_of is not None else path


def load_from_checkpoint(cls: Any, path: Any, *, trust: bool | Iterable[str] = False,
                         allow_pickle: bool | Iterable[str] | None = None, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint`` for a torchkeep checkpoint folder: the folder is read and
    verified here, then handed to Lightning as an in-memory file (``kwargs`` as Lightning's:
    ``map_location``, ``strict``, hyperparameter overrides)."""
    import io

    trust = pickle_opt_in(trust, allow_pickle, "load_from_checkpoint")
    checkpoint = TorchkeepCheckpointIO(trust=trust).load_checkpoint(path)
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    buf.seek(0)
    # Plain containers and tensors only, unless pickled values were allowed above.
    kwargs.setdefault("weights_only", not trust)
    return cls.load_from_checkpoint(buf, **kwargs)
