"""One module per on-disk format; ``detect`` picks the reader from the content, not the name."""
from __future__ import annotations

import importlib
import os

from torchkeep.errors import FormatError
from torchkeep.read.formats.base import Reader, TensorRef

# Order matters: folder formats first, then the most specific file signatures.
READERS: list[tuple[str, str]] = [
    ("torchkeep", "torchkeep.read.formats.native:NativeReader"),
    ("dcp", "torchkeep.read.formats.dcp:DCPReader"),
    ("training-folder", "torchkeep.read.formats.runfolder:TrainingFolderReader"),
    ("deepspeed", "torchkeep.read.formats.deepspeed:DeepSpeedReader"),
    ("diffusers", "torchkeep.read.formats.diffusers:PipelineReader"),
    ("sentence-transformers", "torchkeep.read.formats.sentencetf:SentenceTransformersReader"),
    ("tensordict", "torchkeep.read.formats.tdmemmap:MemmapReader"),
    ("hf-sharded", "torchkeep.read.formats.hfindex:ShardedReader"),
    ("safetensors", "torchkeep.read.formats.safetensors:SafetensorsReader"),
    ("torch-export", "torchkeep.read.formats.pt2:Pt2Reader"),
    ("torch-zip", "torchkeep.read.formats.torchzip:TorchZipReader"),
    ("torch-legacy", "torchkeep.read.formats.torchlegacy:LegacyReader"),
]

HEAD_BYTES = 64


def reader_class(name: str) -> type[Reader]:
    for fmt, target in READERS:
        if fmt == name:
            mod, _, cls = target.partition(":")
            return getattr(importlib.import_module(mod), cls)
    raise FormatError(f"unknown format {name!r}", hint="known: " + ", ".join(f for f, _ in READERS))


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def detect(path: str) -> type[Reader]:
    """The reader class for ``path``, judged by its content; FormatError if none fits."""
    if not os.path.exists(path):
        raise FormatError("no such file or folder", path=path)
    is_dir = os.path.isdir(path)
    head = b"" if is_dir else _head(path)
    if not is_dir and not head:
        raise FormatError("the file is empty", path=path, hint="was it written completely?")
    for fmt, _ in READERS:
        try:
            cls = reader_class(fmt)
        except ModuleNotFoundError:
            continue
        if cls.sniff(path, head):
            return cls
    if is_dir:
        raise FormatError("not a checkpoint folder: found no .metadata (DCP), *.index.json (sharded), "
                          "manifest.json (torchkeep), latest/global_stepN (DeepSpeed), "
                          "model_index.json (diffusers), modules.json (sentence-transformers), "
                          "meta.json (tensordict), trainer_state.json or random_states_0.pkl "
                          "(Trainer, accelerate) or single weights file", path=path)
    shown = head[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        what = f"a text file (starts with {shown.decode('ascii', 'replace')!r})"
    else:
        what = f"unrecognised content (starts with {shown!r})"
    raise FormatError(f"not a checkpoint: {what}", path=path,
                      hint="torchkeep reads torch.save files (zip or legacy), safetensors, "
                           "sharded *.index.json folders, DCP folders and torchkeep checkpoints")
