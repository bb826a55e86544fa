"""Sealed folders: a checkpoint folder that another library wrote (the transformers Trainer's
``checkpoint-N``, ``accelerator.save_state``), made durable and verifiable after the fact.

Sealing fsyncs every file and folder, writes ``torchkeep-manifest.json`` (the xxh3-128 and size of
every file) and then, last, ``torchkeep-commit.json`` (the manifest's sha256): a folder counts as a
checkpoint only once its commit record exists, and it is good only while every file matches the
manifest. The files themselves are the library's own (pickles included); sealing adds checks, it
does not change what loading them runs.

It also lists, verifies and rotates the checkpoint folders of a run directory (newest good one
first, the commit record removed before a folder is deleted), and lists any folder of
checkpoint folders for ``torchkeep ls``/``verify`` (sealed ones and torchkeep's own, whatever
they are named: Lightning's ``epoch=0-step=10.ckpt``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from typing import Any, Iterable, Mapping

from torchkeep.errors import CorruptCheckpointError, LimitExceededError
from torchkeep.keep.retention import CheckpointInfo
from torchkeep.limits import loads_json
from torchkeep.store.checksums import file_record, record_algo, record_mismatch
from torchkeep.store.files import atomic_write, fsync_dir, fsync_file, is_tmp

log = logging.getLogger(__name__)

MANIFEST = "torchkeep-manifest.json"
COMMIT = "torchkeep-commit.json"
FORMAT = "torchkeep-sealed"
VERSION = 1
OURS = (MANIFEST, COMMIT)
STEP = re.compile(r"(\d+)$")


def step_of(name: str | os.PathLike) -> int | None:
    """The step a folder name ends with (``checkpoint-500``, ``checkpoint_3``), or None."""
    m = STEP.search(os.path.basename(os.fspath(name).rstrip("/")))
    return int(m.group(1)) if m else None


def _files(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_tmp(d))
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel not in OURS and not is_tmp(name):
                out.append(rel)
    return out


def _write_json(path: str, obj: Mapping[str, Any]) -> bytes:
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode()
    with atomic_write(path) as f:   # temporary sibling, fsync, rename, fsync of the folder
        f.write(data)
    return data


def seal(folder: str | os.PathLike, *, step: int | None = None,
         meta: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """Make ``folder`` durable and verifiable: fsync every file and folder, write the manifest
    (xxh3-128 and size of every file), then the commit record, last. Sealing again replaces both."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(2, "no checkpoint folder to seal", folder)
    unseal(folder)
    files: dict[str, dict[str, Any]] = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        fsync_file(path)
        with open(path, "rb") as f:
            files[rel] = file_record(f)
    for root, _, _ in os.walk(folder, topdown=False):
        fsync_dir(root)
    step = step if step is not None else step_of(folder)
    nbytes = sum(f["size"] for f in files.values())
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files, **dict(meta or {})}
    data = _write_json(os.path.join(folder, MANIFEST), manifest)
    created = time.time()
    _write_json(os.path.join(folder, COMMIT), {
        "format": FORMAT, "version": VERSION, "step": step, "created": created, "nbytes": nbytes,
        "manifest_sha256": hashlib.sha256(data).hexdigest()})
    log.debug("sealed %s: %d files, %d bytes", folder, len(files), nbytes)
    return CheckpointInfo(step if step is not None else 0, folder, created, nbytes=nbytes,
                          written=nbytes)


def unseal(folder: str | os.PathLike) -> None:
    """Remove the commit record first (durably): the folder stops being a checkpoint before its
    files change or go."""
    path = os.path.join(os.fspath(folder), COMMIT)
    if os.path.exists(path):
        os.unlink(path)
        fsync_dir(os.fspath(folder))


def remove(folder: str | os.PathLike) -> None:
    """Delete a checkpoint folder: its commit record first, then the rest."""
    unseal(folder)
    shutil.rmtree(os.fspath(folder), ignore_errors=True)


def is_sealed(folder: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(os.fspath(folder), COMMIT))


def _read_json(path: str, what: str) -> tuple[dict[str, Any], bytes]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{what} is missing", path=path) from None
    try:
        obj = loads_json(data, path=path, what="the seal record")
    except (UnicodeDecodeError, json.JSONDecodeError, LimitExceededError) as e:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {e}", path=path) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{what} is not a torchkeep seal", path=path)
    return obj, data


def info(folder: str | os.PathLike) -> CheckpointInfo:
    """What the commit record says (status 'ok', 'uncommitted' or 'damaged'); reads no data."""
    folder = os.fspath(folder)
    name_step = step_of(folder)
    if not is_sealed(folder):
        return CheckpointInfo(name_step or 0, folder, status="uncommitted",
                              problems=["not sealed (no torchkeep-commit.json): the save was "
                                        "interrupted, or the folder was written without torchkeep"])
    try:
        rec, _ = _read_json(os.path.join(folder, COMMIT), "commit record")
    except CorruptCheckpointError as e:
        return CheckpointInfo(name_step or 0, folder, status="damaged", problems=[str(e)])
    step = rec.get("step")
    return CheckpointInfo(int(step) if isinstance(step, int) else (name_step or 0), folder,
                          rec.get("created"), nbytes=int(rec.get("nbytes", 0)),
                          written=int(rec.get("nbytes", 0)))


def problems(folder: str | os.PathLike) -> list[str]:
    """Everything wrong with a sealed folder (empty when it is good): commit record, manifest,
    and every file's size and checksum (xxh3-128; sha256 in folders sealed before)."""
    folder = os.fspath(folder)
    try:
        rec, _ = _read_json(os.path.join(folder, COMMIT), "commit record")
        manifest, data = _read_json(os.path.join(folder, MANIFEST), "manifest")
    except CorruptCheckpointError as e:
        return [str(e)]
    if hashlib.sha256(data).hexdigest() != rec.get("manifest_sha256"):
        return [f"{os.path.join(folder, MANIFEST)}: sha256 differs from the commit record's"]
    out = []
    for rel, want in sorted((manifest.get("files") or {}).items()):
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            out.append(f"{path}: missing")
        elif not isinstance(want, Mapping) or record_algo(want) is None:
            out.append(f"{path}: its manifest record holds no checksum")
        elif os.path.getsize(path) != want.get("size"):
            out.append(f"{path}: {os.path.getsize(path)} bytes, the manifest says {want.get('size')} "
                       f"(truncated or rewritten?)")
        else:
            with open(path, "rb") as f:
                bad = record_mismatch(file_record(f, record_algo(want)), want)
            if bad:
                out.append(f"{path}: {bad}")
    return out


def verify(folder: str | os.PathLike) -> CheckpointInfo:
    """:func:`info` plus every file checked against the manifest."""
    i = info(folder)
    if i.status == "ok":
        bad = problems(folder)
        if bad:
            i.status, i.problems = "damaged", bad
    return i


def candidates(parent: str | os.PathLike, prefix: str) -> list[str]:
    """Folders ``<prefix><step>`` in ``parent``, oldest step first."""
    parent = os.fspath(parent)
    pat = re.compile(re.escape(prefix) + r"(\d+)$")
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(parent, n)) for n in names
             if (m := pat.match(n)) and os.path.isdir(os.path.join(parent, n))]
    return [p for _, p in sorted(found)]


def last_good(parent: str | os.PathLike, prefix: str) -> str | None:
    """The newest ``<prefix><step>`` folder of ``parent`` that is sealed and verifies; a warning
    names each newer one skipped and why. None when there is none."""
    skipped = 0
    for folder in reversed(candidates(parent, prefix)):
        i = verify(folder)
        if i.status == "ok":
            if skipped:
                log.info("resuming from %s (%d newer folder(s) skipped)", folder, skipped)
            return folder
        skipped += 1
        warnings.warn(f"torchkeep: skipping {folder}: {i.status}: {'; '.join(i.problems[:3])}",
                      stacklevel=3)
    return None


def rotate(parent: str | os.PathLike, prefix: str, keep: int | None,
           protect: Iterable[str | None] = ()) -> list[str]:
    """Delete old folders of a run: sealed ones beyond the ``keep`` newest (``protect``ed ones,
    e.g. the best, are kept on top), and unsealed leftovers older than the newest sealed one
    (saves that were interrupted). The newest sealed folder is never deleted; each deletion
    removes the commit record first. Returns the deleted folders."""
    folders = candidates(parent, prefix)
    sealed = [f for f in folders if is_sealed(f)]
    if not sealed:
        return []
    newest = sealed[-1]
    keep_set = {os.path.abspath(p) for p in protect if p}
    keep_set.add(os.path.abspath(newest))
    kept = sealed[-keep:] if keep is not None and keep > 0 else sealed   # no limit: keep all
    keep_set.update(os.path.abspath(f) for f in kept)
    removed = []
    newest_step = step_of(newest) or 0
    for f in folders:
        if os.path.abspath(f) in keep_set:
            continue
        if not is_sealed(f):
            if (step_of(f) or 0) >= newest_step:
                continue   # a save that may still be under way, or that a resume will redo
            log.warning("removing %s: never sealed (a save was interrupted)", f)
        remove(f)
        removed.append(f)
    if removed:
        fsync_dir(os.fspath(parent))
    return removed


# -- listing any folder of checkpoint folders (for torchkeep ls / verify) ------------------------

def scan(directory: str, *, check: bool) -> list[CheckpointInfo] | None:
    """The checkpoints of a folder that is not a CheckpointManager's: sealed folders and native
    checkpoint folders under any name (Lightning's), or ``directory`` itself when it is one.
    Oldest step first; with ``check``, every file is verified. None when there are none."""
    from torchkeep.read.formats import native

    if "://" in directory or not os.path.isdir(directory):
        return None
    if os.path.exists(os.path.join(directory, COMMIT)) or os.path.exists(os.path.join(directory, MANIFEST)):
        return [verify(directory) if check else info(directory)]
    subs = [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if os.path.isdir(os.path.join(directory, n)) and not is_tmp(n)]
    if any(native.parse_step(os.path.basename(s)) is not None for s in subs):
        return None   # a CheckpointManager's folder
    out: list[CheckpointInfo] = []
    for s in subs:
        if os.path.exists(os.path.join(s, COMMIT)) or os.path.exists(os.path.join(s, MANIFEST)):
            out.append(verify(s) if check else info(s))
        elif os.path.exists(os.path.join(s, native.MANIFEST)) or os.path.exists(os.path.join(s, native.COMMIT)):
            out.append(native_info(s, check=check))
    if not out:
        return None
    return sorted(out, key=lambda i: (i.step, i.time or 0))


def native_info(folder: str, *, check: bool) -> CheckpointInfo:
    """One native checkpoint folder under any name: its commit record, and with ``check`` its bytes."""
    from torchkeep.read.formats import native
    from torchkeep.store.backends import LocalStorage

    st = LocalStorage(folder)
    try:
        rec = native.read_commit(st, folder)
    except CorruptCheckpointError as e:
        return CheckpointInfo(step_of(folder) or 0, folder, status="damaged", problems=[str(e)])
    if rec is None:
        return CheckpointInfo(step_of(folder) or 0, folder, status="uncommitted")
    i = CheckpointInfo(int(rec.get("step") or 0), folder, rec.get("created"),
                       metrics={k: v for k, v in (rec.get("metrics") or {}).items()
                                if isinstance(v, (int, float, str))},
                       nbytes=int(rec.get("nbytes", 0)), written=int(rec.get("written", 0)))
    if check:
        bad = native.verify_folder(st, folder)
        if bad:
            i.status, i.problems = "damaged", [str(p) for p in bad]
    return i
