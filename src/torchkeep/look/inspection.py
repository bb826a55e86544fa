"""What a checkpoint holds, told the way a user asks: the model (parameters by dtype, buffers,
tied names), the optimizer (type, per-parameter state by name), the scheduler, the progress,
and problems the archive's directory already shows, all without reading tensor bytes.

``describe(ck)`` returns a :class:`Contents`; ``torchkeep inspect`` renders it and ``--json``
prints its ``to_dict()``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from torchkeep.read import tree as _tree
from torchkeep.read.formats.base import Reader, TensorRef

log = logging.getLogger(__name__)

# Buffers every torch layer registers under these names (BatchNorm statistics, HF position ids).
BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked", "position_ids",
                          "token_type_ids", "inv_freq", "attn_mask", "mask"})
PROGRESS_KEYS = ("epoch", "global_step", "global_steps", "step", "iteration", "iter", "steps",
                 "global_samples", "epochs_trained")
# Optimizer state keys -> the optimizer family that keeps them (named as the state shows it).
_OPTIMIZER_FAMILIES = (
    ({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, "Adam-style"),
    ({"exp_avg", "exp_avg_sq"}, "Adam-style"),
    ({"momentum_buffer"}, "SGD-style"),
    ({"square_avg", "acc_delta"}, "Adadelta"),
    ({"square_avg"}, "RMSprop"),
    ({"sum"}, "Adagrad"),
    ({"exp_avg", "exp_inf"}, "Adamax"),
    ({"exp_avg_sq_row", "exp_avg_sq_col"}, "Adafactor"),
    ({"exp_avg"}, "Lion-style"),
)


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@dataclass
class ModelPart:
    """The model weights: parameters apart from buffers and tied duplicates."""

    tensors: int = 0
    parameters: int = 0                       # elements of parameters, each storage once
    parameter_bytes: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)   # dtype -> parameter elements
    buffers: int = 0                          # buffer tensors
    buffer_elements: int = 0
    tied: dict[str, str] = field(default_factory=dict)       # name -> the name it duplicates
    quantized: dict[str, str] = field(default_factory=dict)  # name -> scheme
    empty: list[str] = field(default_factory=list)           # zero-element parameters
    buffers_by: str = ""                      # how buffers were told apart


@dataclass
class OptimizerPart:
    path: str
    family: str = "unknown"
    state_keys: list[str] = field(default_factory=list)
    params: int = 0                           # parameters with state
    by_name: bool = False                     # state keyed by parameter names
    names_from: str = ""                      # where the names came from
    state: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> key -> summary
    groups: list[dict[str, Any]] = field(default_factory=list)
    elements: int = 0
    nbytes: int = 0


@dataclass
class Contents:
    model: ModelPart
    optimizer: list[OptimizerPart] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=dict)       # path -> summary values
    progress: dict[str, Any] = field(default_factory=dict)
    other_tensors: dict[str, int] = field(default_factory=dict)   # group -> tensors
    problems: list[str] = field(default_factory=list)            # damage: exit 2
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the model ---------------------------------------------------------------------------

def _buffer_hint(ck: Any) -> set[str]:
    names = getattr(ck.reader, "buffer_names", None)
    root = ck.tree
    if names is None and isinstance(root, Mapping) and isinstance(root.get("buffer_names"), list):
        names = root["buffer_names"]  # a DeepSpeed model-states file
    return set(names or ())


def _storage_key(r: TensorRef) -> Any:
    if r.storage is None:
        return ("id", id(r))
    return (id(r.reader), r.storage, r.offset, tuple(r.shape), r.stride, r.dtype)


def weight_refs(ck: Any) -> dict[str, TensorRef]:
    """The model weights by clean name, the tensors of packed tuples (quantized packed params)
    included as ``name.0``, ``name.1``."""
    out: dict[str, TensorRef] = {}
    for k, v in ck.state_items().items():
        if isinstance(v, TensorRef):
            out[k] = v
        elif isinstance(v, tuple) and any(isinstance(x, TensorRef) for x in v):
            out.update((f"{k}.{i}", x) for i, x in enumerate(v) if isinstance(x, TensorRef))
    return out


def _quant_buffers(names: Any) -> set[str]:
    """``scale``/``zero_point`` of torch.ao quantized modules (beside their ``_packed_params``):
    output quantization parameters, not weights."""
    mods = {n.split("._packed_params.")[0] for n in names if "._packed_params." in n}
    return {f"{m}.{b}" for m in mods for b in ("scale", "zero_point")}


def describe_model(ck: Any) -> ModelPart:
    refs = weight_refs(ck)
    m = ModelPart(tensors=len(refs))
    known = _buffer_hint(ck) | _quant_buffers(refs)
    # Only whole-model pickles and exported programs mark every parameter as such.
    flagged = (ck.format == "torch-export" or ck.summary.kind == "whole-model") and \
        any(r.is_parameter for r in refs.values())
    m.buffers_by = ("the file marks parameters" if flagged else
                    "names the writer lists as buffers" if known else
                    "integer dtypes and standard buffer names (running_mean, ...)")
    seen: dict[Any, str] = {}
    for name, r in refs.items():
        key = _storage_key(r)
        if key in seen:
            m.tied[name] = seen[key]
            continue
        seen[key] = name
        scheme = getattr(r, "scheme", None)
        if scheme:
            m.quantized[name] = scheme
        last = name.rpartition(".")[2]
        is_buffer = (not r.is_parameter) if flagged else not r.is_parameter and (
            name in known or last in BUFFER_NAMES or
            not (r.dtype.is_floating_point or r.dtype.is_complex or scheme))
        if is_buffer:
            m.buffers += 1
            m.buffer_elements += r.numel
            continue
        if r.numel == 0:
            m.empty.append(name)
        m.parameters += r.numel
        m.parameter_bytes += r.nbytes
        d = _dtype(getattr(r, "stored_dtype", r.dtype)) if scheme else _dtype(r.dtype)
        m.by_dtype[d] = m.by_dtype.get(d, 0) + r.numel
    return m


# -- optimizer, scheduler, progress ------------------------------------------------------

def _find(obj: Any, test, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Mappings below ``obj`` (itself included) for which ``test`` holds, outermost first."""
    if depth > 6:
        return []
    if isinstance(obj, (list, tuple)):  # Lightning keeps optimizer_states and lr_schedulers in lists
        items: Any = enumerate(obj)
    elif isinstance(obj, Mapping):
        if test(obj):
            return [(prefix, obj)]
        items = obj.items()
    else:
        return []
    out = []
    for k, v in items:
        out.extend(_find(v, test, _tree.join(prefix, k), depth + 1))
    return out


def _is_optimizer(o: Mapping) -> bool:
    return isinstance(o.get("state"), Mapping) and ("param_groups" in o or "zero_stage" in o)


def _is_scheduler(o: Mapping) -> bool:
    return "last_epoch" in o and ("base_lrs" in o or "_step_count" in o)


def _family(keys: set[str]) -> str:
    for want, name in _OPTIMIZER_FAMILIES:
        if want <= keys:
            return name
    return "unknown"


def _short(v: Any) -> str:
    if isinstance(v, TensorRef):
        return f"{_dtype(v.dtype)}{tuple(v.shape)}"
    r = repr(v)
    return r if len(r) <= 40 else r[:39] + "…"


def _param_names(opt: Mapping, model_names: list[str]) -> tuple[dict[Any, str], str]:
    """Parameter index -> name, and where the names came from."""
    groups = opt.get("param_groups") or []
    names: dict[Any, str] = {}
    for g in groups if isinstance(groups, list) else []:
        if isinstance(g, Mapping) and isinstance(g.get("param_names"), list):
            names.update(zip(g.get("params") or [], g["param_names"]))
    if names:
        return names, "the optimizer's param_names"
    if isinstance(opt.get("param_names"), list):
        return dict(enumerate(opt["param_names"])), "the optimizer's param_names"
    ids = [i for g in groups if isinstance(g, Mapping) for i in (g.get("params") or [])]
    # With one group the ids follow model.parameters(), the state dict's parameter order; with
    # several (decay / no decay) the order depends on how the groups were built: not told.
    if ids and len(groups) == 1 and len(ids) == len(model_names):
        return dict(zip(ids, model_names)), "the model's parameter order"
    return {}, ""


def _shapes_agree(state: Mapping, names: dict[Any, str], shapes: dict[str, tuple]) -> bool:
    """Every per-parameter state tensor shaped like its parameter (or a scalar)."""
    for pid, st in state.items():
        want = shapes.get(names.get(pid, ""))
        if want is None or not isinstance(st, Mapping):
            return False
        for v in st.values():
            if isinstance(v, TensorRef) and v.numel > 1 and tuple(v.shape) != want:
                return False
    return True


def describe_optimizer(path: str, opt: Mapping, model_names: list[str],
                       shapes: dict[str, tuple] | None = None) -> OptimizerPart:
    """``model_names``: the model's parameters in stored order, or [] when the format does not
    keep the order (safetensors sorts names), so names cannot follow from positions."""
    part = OptimizerPart(path=path or "<root>")
    state = opt["state"]
    if state and all(isinstance(p, str) for p in state):
        names, part.names_from = {}, "the state's keys"
    else:
        names, part.names_from = _param_names(opt, model_names)
        if part.names_from == "the model's parameter order" and not _shapes_agree(
                state, names, shapes or {}):
            names, part.names_from = {}, ""
    keys: set[str] = set()
    for pid, st in state.items():
        if not isinstance(st, Mapping):
            continue
        keys.update(str(k) for k in st)
        name = pid if isinstance(pid, str) else names.get(pid, f"#{pid}")
        part.state[str(name)] = {str(k): _short(v) for k, v in st.items()}
        for v in st.values():
            if isinstance(v, TensorRef):
                part.elements += v.numel
                part.nbytes += v.nbytes
    part.by_name = bool(state) and (all(isinstance(p, str) for p in state) or bool(names))
    part.params = len(part.state)
    part.state_keys = sorted(keys)
    part.family = _family(keys)
    for g in opt.get("param_groups") or []:
        if isinstance(g, Mapping):
            part.groups.append({k: (len(v) if k in ("params", "param_names") and isinstance(v, list)
                                    else v) for k, v in g.items()
                                if isinstance(v, (int, float, str, bool, type(None), list, tuple))})
    return part


def _progress(root: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cands = [("", root)]
    if isinstance(root, Mapping):
        cands += [(str(k), v) for k, v in root.items() if isinstance(v, Mapping)
                  and str(k) in ("progress", "trainer_state", "loops", "state")]
    for prefix, obj in cands:
        if not isinstance(obj, Mapping):
            continue
        for k in PROGRESS_KEYS:
            v = obj.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[_tree.join(prefix, k)] = v
    return out


# -- problems the directory shows --------------------------------------------------------

def _readers(reader: Reader) -> list[Reader]:
    out, stack, seen = [], [reader], set()
    while stack:
        r = stack.pop()
        if id(r) in seen:
            continue
        seen.add(id(r))
        out.append(r)
        for attr in ("_shards", "_readers", "_parts"):
            kids = getattr(r, attr, None)
            if isinstance(kids, dict):
                stack.extend(k for k in kids.values() if isinstance(k, Reader))
    return out


def storage_problems(ck: Any) -> list[str]:
    """Missing or short tensor storages, from the archives' directories (no bytes read)."""
    ck.tree
    out = []
    for r in _readers(ck.reader):
        check = getattr(r, "check_storages", None)
        if check is not None:
            out.extend(check())
    return out


# -- everything --------------------------------------------------------------------------

def describe(ck: Any) -> Contents:
    """What ``ck`` holds (see the module docstring)."""
    root = ck.tree
    model = describe_model(ck)
    c = Contents(model=model)
    refs = weight_refs(ck)
    hint = _buffer_hint(ck)
    params = [n for n, r in refs.items() if n not in model.tied and (
        r.is_parameter or (r.dtype.is_floating_point and n.rpartition(".")[2] not in BUFFER_NAMES
                           and n not in hint))]
    ordered = all(r.reader.format != "safetensors" for r in refs.values())
    shapes = {n: tuple(r.shape) for n, r in refs.items()}
    for path, opt in _find(root, _is_optimizer):
        c.optimizer.append(describe_optimizer(path, opt, params if ordered else [], shapes))
    for path, sch in _find(root, _is_scheduler):
        c.scheduler[path or "<root>"] = {k: sch[k] for k in ("last_epoch", "_step_count", "base_lrs",
                                                            "_last_lr") if k in sch}
    c.progress = _progress(root)
    wrapper = ck.wrapper
    inside = {o.path for o in c.optimizer}
    weight_ids = {id(r) for r in refs.values()}
    for e in ck.entries():
        if wrapper is not None and (e.name == wrapper or e.name.startswith(wrapper + ".")
                                    if wrapper else id(e.ref) in weight_ids):
            continue
        if any(p == "<root>" or e.name.startswith(p + ".") for p in inside):
            continue
        head = e.name.split(".")[0]
        c.other_tensors[head] = c.other_tensors.get(head, 0) + 1
    c.problems = storage_problems(ck)
    from torchkeep.read.formats.deepspeed import zero3_placeholders

    empty = zero3_placeholders(root)
    if empty:
        c.notes.append(f"{len(empty)} parameters are (0,) placeholders (a DeepSpeed ZeRO-3 "
                          "model-states file: the weights live in the optimizer partitions; open "
                          "the run folder)")
    return c
