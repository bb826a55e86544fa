"""DeepSpeed ZeRO checkpoints (stages 1-3, any data-parallel world size), read without DeepSpeed.

A run folder holds ``latest`` (the tag of the newest save) and one ``global_stepN/`` folder per
save. In it, ``mp_rank_00_model_states.pt`` (stages 1-2) or ``zero_pp_rank_R_mp_rank_00_model_
states.pt`` (stage 3, one per rank) carry the module's state dict (half precision, and under
ZeRO-3 only ``(0,)`` placeholders), the parameter shapes, buffer names and progress; the fp32
master weights and the optimizer moments live as flat partitions in ``*_optim_states.pt``, one
per rank. The reader lays the partitions side by side the way DeepSpeed's own ``zero_to_fp32``
does and hands every parameter (and every per-parameter moment) out as a lazy tensor, so
``state_dict()`` gives the full fp32 weights. Every file goes through torchkeep's restricted
unpickler; DeepSpeed's own classes in them (ZeroStageEnum, LossScaler, fragment_address) stay
placeholders and are read as data.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import Reader, TensorRef

log = logging.getLogger(__name__)

_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# Keys of the model-states file that the reader turns into tensors or drops as internals.
_INTERNAL = ("module", "buffer_names", "param_shapes", "frozen_param_shapes", "shared_params",
             "frozen_param_fragments", "optimizer")


@dataclass(frozen=True)
class Piece:
    """``length`` elements of the flat 1-D tensor ``src`` from ``start``."""

    src: TensorRef
    start: int
    length: int


@dataclass(frozen=True)
class Plan:
    """How one full tensor is put together from flat partitions."""

    pieces: tuple[Piece, ...]
    cast: torch.dtype | None = None


def step_folder(path: str) -> str | None:
    """The ``global_stepN`` folder ``path`` designates (itself, or the one ``latest`` names)."""
    if not os.path.isdir(path):
        return None
    names = os.listdir(path)
    if any(_MODEL_STATES.match(n) for n in names):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest) and os.path.getsize(latest) < 4096:
        with open(latest, encoding="utf-8", errors="replace") as f:
            tag = f.read().strip()
        cand = os.path.join(path, tag)
        if tag and "/" not in tag and os.path.isdir(cand) and any(
                _MODEL_STATES.match(n) for n in os.listdir(cand)):
            return cand
    return None


def _rank_files(folder: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(model-states files, optimizer files) as (data-parallel rank, path), rank order."""
    models, optims = [], []
    for n in sorted(os.listdir(folder)):
        for rx, out in ((_MODEL_STATES, models), (_OPTIM_STATES, optims)):
            m = rx.match(n)
            if m:
                if int(m.group(2)) != 0:
                    raise FormatError(f"{n}: tensor-parallel DeepSpeed checkpoints (mp_rank > 0) "
                                      "are not assembled by torchkeep", path=folder,
                                      hint="open one mp_rank's files directly")
                out.append((int(m.group(1) or 0), os.path.join(folder, n)))
    if any(n.startswith("layer_") and n.endswith("model_states.pt") for n in os.listdir(folder)):
        raise FormatError("pipeline-parallel DeepSpeed checkpoints (layer_XX-model_states.pt) are "
                          "not assembled by torchkeep", path=folder)
    return sorted(models), sorted(optims)


def _plain(obj: Any) -> Any:
    """DeepSpeed's placeholders as data: enums as their value, other objects as their state."""
    from torchkeep.read.unpickler import Opaque

    if isinstance(obj, Opaque):
        if obj.state is None and len(obj.args) == 1 and not obj.kwargs:
            return obj.args[0]
        state = obj.state if isinstance(obj.state, dict) else {}
        return {"class": obj.global_name, **{k: _plain(v) for k, v in state.items()}}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _span(flats: Sequence[TensorRef], start: int, length: int) -> list[Piece]:
    """Pieces covering ``[start, start + length)`` of the flats laid end to end."""
    out, base = [], 0
    for f in flats:
        n = f.numel
        lo, hi = max(start, base), min(start + length, base + n)
        if lo < hi:
            out.append(Piece(f, lo - base, hi - lo))
        base += n
    return out


class DeepSpeedReader(Reader):
    format = "deepspeed"
    description = "DeepSpeed ZeRO checkpoint (run folder with latest, or a global_stepN folder)"
    kind = "deepspeed"

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self.folder = step_folder(self.path)
        if self.folder is None:
            raise FormatError("not a DeepSpeed checkpoint folder (no *_model_states.pt here or in "
                              "the folder 'latest' names)", path=self.path)
        self._readers: dict[str, Reader] = {}

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return not head and step_folder(path) is not None

    def _open(self, file: str) -> Any:
        from torchkeep.read.formats.torchzip import TorchZipReader

        r = self._readers.get(file)
        if r is None:
            r = TorchZipReader(file, trust=self.trust)
            self._readers[file] = r
        return r

    def _tree_of(self, file: str) -> Any:
        tree = self._open(file).read_tree()
        if not isinstance(tree, Mapping):
            raise CorruptCheckpointError("expected a dict at the top level", path=file)
        return tree

    # -- reading -----------------------------------------------------------------------
    def read_tree(self) -> Any:
        models, optims = _rank_files(self.folder)
        if not models:
            raise FormatError("no *_model_states.pt in the checkpoint folder", path=self.folder)
        states = [self._tree_of(f) for _, f in models]
        ms = states[0]
        for key in ("module", "param_shapes", "buffer_names"):
            if key not in ms:
                raise FormatError(f"{os.path.basename(models[0][1])} has no {key!r}: not a DeepSpeed "
                                  "model-states file", path=self.folder)
        opts = [self._tree_of(f) for _, f in optims]
        if opts:
            osd = opts[0].get("optimizer_state_dict")
            if not isinstance(osd, Mapping):
                raise FormatError("optimizer file without optimizer_state_dict", path=optims[0][1])
            stage = int(_plain(osd.get("zero_stage", 1)))
            weights, optimizer, world = self._from_partitions(ms, states, opts, stage)
        else:
            stage = int(_plain(ms.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
                        if isinstance(ms.get("ds_config"), Mapping) else 0)
            weights, world = self._from_model_states(ms, stage), len(models)
            optimizer = None
        self.buffer_names = [b for b in ms.get("buffer_names") or () if isinstance(b, str)]
        tree: dict[str, Any] = {"module": weights}
        if optimizer is not None:
            tree["optimizer"] = optimizer
        tree.update({k: _plain(v) for k, v in ms.items() if k not in _INTERNAL})
        self.metadata = {"tag": os.path.basename(self.folder), "zero_stage": stage,
                         "world_size": world, "ds_version": ms.get("ds_version"),
                         "weights": "fp32 from optimizer partitions" if opts else
                         "model states as saved"}
        return tree

    def _from_model_states(self, ms: Mapping[str, Any], stage: int) -> dict[str, Any]:
        module = dict(ms["module"])
        empty = [k for k, v in module.items() if isinstance(v, TensorRef) and v.numel == 0
                 and _numel(_shapes(ms).get(k, (0,))) > 0]
        if empty:
            raise FormatError(
                f"no *_optim_states.pt beside the model states, and the model states hold only "
                f"(0,) placeholders for {len(empty)} parameters (ZeRO-3 keeps the weights in the "
                f"optimizer partitions), e.g. {empty[0]!r}", path=self.folder,
                hint="copy the zero_pp_rank_*_optim_states.pt files into this folder")
        dts = sorted({str(v.dtype) for v in module.values() if isinstance(v, TensorRef)})
        log.warning("%s: no optimizer partitions; the weights are the model states' copy (%s), "
                    "not fp32 master weights", self.folder, ", ".join(dts))
        return module

    def _from_partitions(self, ms: Mapping[str, Any], states: list[Mapping[str, Any]],
                         opts: list[Mapping[str, Any]], stage: int
                         ) -> tuple[dict[str, Any], dict[str, Any], int]:
        osds = [o["optimizer_state_dict"] for o in opts]
        world = osds[0].get("partition_count")
        world = max(world) if isinstance(world, (list, tuple)) else int(world)
        if world != len(opts):
            raise CorruptCheckpointError(
                f"the optimizer state says {world} ranks but {len(opts)} *_optim_states.pt files are "
                f"here", path=self.folder, hint="was a rank's save lost or overwritten?")
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        flats = [list(o[key]) for o in osds]
        shapes_by_group = [dict(g) for g in ms["param_shapes"]]
        if stage == 3:
            plans = _zero3_plans(flats, shapes_by_group, self.folder)
        else:
            pads = osds[0].get("param_alignment_paddings")
            plans = _zero12_plans(flats, shapes_by_group, pads, world, self.folder)
        weights: dict[str, Any] = {}
        buffers = set(ms.get("buffer_names") or ())
        for k, v in ms["module"].items():
            if k in buffers and isinstance(v, TensorRef):
                weights[k] = self._ref((Piece(_flat(v), 0, v.numel),), v.shape, v,
                                       torch.float32 if v.dtype.is_floating_point else None)
        weights.update(self._frozen(ms, states, stage))
        for name, (pieces, shape) in plans.items():
            weights[name] = self._ref(pieces, shape, pieces[0].src, None)
        for alias, base in (ms.get("shared_params") or {}).items():
            if base in weights:
                weights[alias] = weights[base]
        optimizer = self._optimizer(osds, stage, shapes_by_group, world)
        return weights, optimizer, world

    def _frozen(self, ms: Mapping[str, Any], states: list[Mapping[str, Any]], stage: int
                ) -> dict[str, TensorRef]:
        shapes = ms.get("frozen_param_shapes") or {}
        out = {}
        for name, shape in shapes.items():
            frags = [s["frozen_param_fragments"][name] for s in (states if stage == 3 else states[:1])]
            pieces = tuple(Piece(_flat(f), 0, f.numel) for f in frags)
            out[name] = self._ref(_trim(pieces, _numel(shape)), tuple(shape), frags[0], None)
        return out

    def _optimizer(self, osds: list[Mapping[str, Any]], stage: int,
                   shapes_by_group: list[dict[str, Any]], world: int) -> dict[str, Any]:
        """The base optimizer's per-parameter state, assembled like the weights."""
        inner = [o.get("optimizer_state_dict") if stage == 3 else o.get("base_optimizer_state")
                 for o in osds]
        out: dict[str, Any] = {"zero_stage": stage, "world_size": world}
        if not all(isinstance(i, Mapping) and isinstance(i.get("state"), Mapping) for i in inner):
            out["note"] = "optimizer moments not saved in the partitions"
            return out
        groups = sorted(inner[0]["state"])
        per_param: dict[str, dict[str, Any]] = {}
        keys = {k for g in groups for k, v in inner[0]["state"][g].items()
                if isinstance(v, TensorRef) and v.numel > 1}
        for k in sorted(keys):
            flats = [[i["state"][g][k] for g in groups] for i in inner]
            if stage == 3:
                plans = _zero3_plans(flats, shapes_by_group, self.folder, check=False)
            else:
                plans = _zero12_plans(flats, shapes_by_group, None, world, self.folder, check=False)
            for name, (pieces, shape) in plans.items():
                per_param.setdefault(name, {})[k] = self._ref(pieces, shape, pieces[0].src, None)
        for gi, g in enumerate(groups):
            for k, v in inner[0]["state"][g].items():
                if k in keys:
                    continue
                names = shapes_by_group[gi] if stage != 3 else {
                    n: s for d in shapes_by_group for n, s in d.items()}
                for name in names:
                    per_param.setdefault(name, {})[k] = v
        out["state"] = per_param
        pgs = []
        for gi, pg in enumerate(inner[0].get("param_groups") or []):
            pg = dict(pg)
            if gi < len(shapes_by_group):
                pg["params"] = list(shapes_by_group[gi])
            pgs.append(pg)
        out["param_groups"] = pgs
        return out

    def _ref(self, pieces: Sequence[Piece], shape: Any, like: TensorRef,
             cast: torch.dtype | None) -> TensorRef:
        shape = tuple(int(s) for s in shape)
        dtype = cast or like.dtype
        return TensorRef(shape=shape, dtype=dtype, reader=self, key=Plan(tuple(pieces), cast),
                         storage=None, requires_grad=False, location=like.location)

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu",
             **kw: Any) -> list[torch.Tensor]:
        """Assemble each ref from its pieces (sources are read once per call, mapped)."""
        srcs: dict[int, TensorRef] = {}
        for r in refs:
            for p in r.key.pieces:
                srcs.setdefault(id(p.src), p.src)
        by_reader: dict[int, tuple[Reader, list[int]]] = {}
        for i, s in srcs.items():
            by_reader.setdefault(id(s.reader), (s.reader, []))[1].append(i)
        got: dict[int, torch.Tensor] = {}
        for reader, ids in by_reader.values():
            try:
                tensors = reader.load([srcs[i] for i in ids], "cpu", mmap=True)
            except TypeError:  # a reader that cannot map
                tensors = reader.load([srcs[i] for i in ids], "cpu")
            got.update((i, t.reshape(-1)) for i, t in zip(ids, tensors))
        out, done = [], {}
        for r in refs:
            t = done.get(id(r))
            if t is None:
                parts = [got[id(p.src)][p.start:p.start + p.length] for p in r.key.pieces]
                t = torch.cat(parts) if parts else torch.empty(0, dtype=r.dtype)
                t = t.view(r.shape)
                if r.key.cast is not None:
                    t = t.to(r.key.cast)
                t = t.to(device).clone() if torch.device(device).type == "cpu" else t.to(device)
                done[id(r)] = t
            out.append(t)
        return out

    def globals(self) -> list:
        models, optims = _rank_files(self.folder)
        out = []
        for _, f in models + optims:
            out.extend(self._open(f).globals())
        return out

    def files(self) -> list[str]:
        models, optims = _rank_files(self.folder)
        return [f for _, f in models + optims]

    def close(self) -> None:
        for r in self._readers.values():
            r.close()


def _flat(ref: TensorRef) -> TensorRef:
    """``ref`` seen as a flat 1-D tensor (it must be contiguous)."""
    if ref.stride is not None and ref.numel > 1:
        from torchkeep.read.formats.base import contiguous_stride
        if tuple(ref.stride) != contiguous_stride(ref.shape):
            raise CorruptCheckpointError("a DeepSpeed partition is not contiguous", path=str(ref.key))
    return TensorRef(shape=(ref.numel,), dtype=ref.dtype, reader=ref.reader, key=ref.key,
                     storage=ref.storage, offset=ref.offset, stride=(1,), location=ref.location)


def _trim(pieces: Sequence[Piece], n: int) -> tuple[Piece, ...]:
    out, left = [], n
    for p in pieces:
        if left <= 0:
            break
        take = min(p.length, left)
        out.append(Piece(p.src, p.start, take))
        left -= take
    return tuple(out)


def _shapes(ms: Mapping[str, Any]) -> dict[str, Any]:
    return {n: s for d in ms.get("param_shapes") or () for n, s in dict(d).items()}


def _zero12_plans(flats: list[list[TensorRef]], shapes_by_group: list[dict[str, Any]],
                  pads: Any, world: int, where: str, check: bool = True
                  ) -> dict[str, tuple[tuple[Piece, ...], tuple[int, ...]]]:
    """ZeRO-1/2: each group's flat vector is the ranks' partitions end to end; parameters follow
    one another in it (with optional per-parameter alignment padding)."""
    plans = {}
    for g, shapes in enumerate(shapes_by_group):
        parts = [_flat(r[g]) for r in flats]
        avail = sum(p.numel for p in parts)
        offset = 0
        gpads = pads[g] if pads is not None else None
        if gpads is not None and len(gpads) != len(shapes):
            raise CorruptCheckpointError(f"group {g}: {len(gpads)} alignment paddings for "
                                         f"{len(shapes)} parameters", path=where)
        for i, (name, shape) in enumerate(shapes.items()):
            n = _numel(shape)
            plans[name] = (tuple(_span(parts, offset, n)), tuple(shape))
            offset += n + (int(gpads[i]) if gpads is not None else 0)
        align = 2 * world
        if check and align * math.ceil(offset / align) != align * math.ceil(avail / align):
            raise CorruptCheckpointError(
                f"parameter group {g} needs {offset} elements but the partitions hold {avail}",
                path=where, hint="the model states and the optimizer files do not belong together")
    return plans


def _zero3_plans(flats: list[list[TensorRef]], shapes_by_group: list[dict[str, Any]],
                 where: str, check: bool = True
                 ) -> dict[str, tuple[tuple[Piece, ...], tuple[int, ...]]]:
    """ZeRO-3: every parameter is split in ``world`` equal parts (the last padded); rank r's
    flat groups hold part r of each parameter, one after the other."""
    world = len(flats)
    per_rank = [[_flat(t) for t in r] for r in flats]
    shapes = {n: s for d in shapes_by_group for n, s in d.items()}
    plans, offset = {}, 0
    for name, shape in shapes.items():
        n = _numel(shape)
        part = math.ceil(n / world)
        pieces: list[Piece] = []
        for r in range(world):
            pieces.extend(_span(per_rank[r], offset, part))
        plans[name] = (_trim(pieces, n), tuple(shape))
        offset += part
    avail = sum(t.numel for t in per_rank[0])
    if check and offset != avail:
        raise CorruptCheckpointError(f"the parameters need {offset} elements per rank but rank 0's "
                                     f"partition holds {avail}", path=where,
                                     hint="the model states and the optimizer files do not belong together")
    return plans


def zero3_placeholders(tree: Any) -> list[str]:
    """Parameters a DeepSpeed model-states file keeps only as empty placeholders (ZeRO-3): names
    whose tensor in ``module`` is empty while ``param_shapes`` gives them elements."""
    if not isinstance(tree, Mapping) or not isinstance(tree.get("module"), Mapping) \
            or "param_shapes" not in tree or "buffer_names" not in tree:
        return []
    try:
        shapes = _shapes(tree)
    except (TypeError, ValueError):
        return []
    module = tree["module"]
    return [n for n, s in shapes.items() if isinstance(module.get(n), TensorRef)
            and module[n].numel == 0 and _numel(s) > 0]
