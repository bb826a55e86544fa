"""Quantized tensors read as data: ``torch.ao`` quantized tensors (per-tensor and per-channel,
as found in ``quantize_dynamic`` packed params) and torchao's tensor subclasses.

The restricted unpickler turns each into a :class:`QuantizedRef`: the logical shape and dtype, a
``scheme`` that says how the values are stored, and the component tensors (integer values,
scales, zero points) as lazy refs into the file. Loading rebuilds the tensor the writer saved:
a torch quantized tensor through torch's own constructors, a torchao tensor through torch's
wrapper-subclass rebuild with the class taken from a short list of torchao's data-only tensor
classes (torchao must be installed for those). No code named by the file is run.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from torchkeep.errors import FormatError
from torchkeep.read.formats.base import Reader, TensorRef

# The integer dtype holding a torch quantized dtype's values.
INT_REPR = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}

# torchao tensor subclasses whose pickled state is plain tensors and values (rebuilt by torch's
# wrapper-subclass constructor and attribute assignment; their constructors are not called).
TORCHAO_CLASSES = frozenset({
    "torchao.quantization.Int8Tensor", "torchao.quantization.Int4Tensor",
    "torchao.quantization.Float8Tensor", "torchao.quantization.IntxUnpackedToInt8Tensor",
    "torchao.quantization.Int4PlainInt32Tensor", "torchao.quantization.Int4PreshuffledTensor",
    "torchao.quantization.Int4TilePackedTo4dTensor",
    "torchao.dtypes.nf4tensor.NF4Tensor", "torchao.quantization.NF4Tensor",
})

# Plain records (dataclasses, enums) torchao keeps in those tensors' state: rebuilt like pickle
# does (enum by value, dataclass by filling __dict__), never by calling their constructors.
TORCHAO_DATA = frozenset({
    "torchao.quantization.quantize_.workflows.int8.int8_tensor.QuantizeTensorToInt8Kwargs",
    "torchao.quantization.quantize_.workflows.float8.float8_tensor.QuantizeTensorToFloat8Kwargs",
    "torchao.quantization.granularity.PerRow", "torchao.quantization.granularity.PerTensor",
    "torchao.quantization.granularity.PerAxis", "torchao.quantization.granularity.PerGroup",
    "torchao.quantization.granularity.PerToken", "torchao.quantization.granularity.PerBlock",
    "torchao.quantization.quant_primitives.MappingType",
    "torchao.quantization.quant_primitives.ZeroPointDomain",
    "torchao.quantization.quantize_.common.kernel_preference.KernelPreference",
    "torchao.quantization.quantize_.common.packing_format.PackingFormat",
    "torchao.float8.inference.Float8MMConfig", "torchao.quantization.Float8MMConfig",
})


def _placeholder(v: Any) -> bool:
    """An instance of a class the restricted unpickler did not import (see read.unpickler;
    not imported here, as the unpickler imports this module)."""
    return type(v).__module__ == "torchkeep.placeholders"


def _data_ok(v: Any) -> bool:
    """True when ``v`` holds only plain values and placeholders of TORCHAO_DATA records."""
    if _placeholder(v):
        state = list(v.state.values()) if isinstance(v.state, dict) else [v.state]
        return v.global_name in TORCHAO_DATA and all(_data_ok(x) for x in (*v.args, *state))
    if isinstance(v, (list, tuple)):
        return all(_data_ok(x) for x in v)
    if isinstance(v, dict):
        return all(_data_ok(x) for x in v.values())
    return True


def _rebuild_data(v: Any) -> Any:
    """TORCHAO_DATA placeholders as the real records (torchao imported)."""
    if _placeholder(v):
        cls = _import(v.global_name)
        if v.state is None and len(v.args) == 1 and isinstance(cls, type) and \
                issubclass(cls, __import__("enum").Enum):
            return cls(_rebuild_data(v.args[0]))
        obj = object.__new__(cls)
        if isinstance(v.state, dict):
            for k, x in v.state.items():
                object.__setattr__(obj, k, _rebuild_data(x))
        return obj
    if isinstance(v, list):
        return [_rebuild_data(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_rebuild_data(x) for x in v)
    if isinstance(v, dict):
        return {k: _rebuild_data(x) for k, x in v.items()}
    return v


def _import(name: str) -> Any:
    module, _, cls = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise FormatError(f"rebuilding {name} needs torchao ({type(e).__name__}: {e})",
                          hint="pip install torchao, or read the weights as float with "
                               "state_dict(dequantize=True) once torchao is installed") from None


def _scheme_name(q: Any) -> str:
    return str(q).replace("torch.", "")


@dataclass(eq=False)
class QuantizedRef(TensorRef):
    """A quantized tensor not yet read: ``components`` are its stored parts by name."""

    scheme: str = ""
    components: dict[str, Any] = field(default_factory=dict, repr=False)
    cls_name: str | None = None            # torchao class, None for torch.ao quantized tensors

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.components.values() if isinstance(v, TensorRef))

    @property
    def stored_dtype(self) -> torch.dtype:
        base = self.components.get("int_repr") or self.components.get("qdata")
        return base.dtype if isinstance(base, TensorRef) else self.dtype


class QuantizedLoader(Reader):
    """Reads the components of quantized refs from their own readers and rebuilds the tensors."""

    format = "quantized"

    def __init__(self) -> None:
        super().__init__("<quantized>")

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return False

    def read_tree(self) -> Any:
        return {}

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu",
             **kw: Any) -> list[torch.Tensor]:
        parts: dict[int, TensorRef] = {}
        for r in refs:
            for v in r.components.values():  # type: ignore[attr-defined]
                if isinstance(v, TensorRef):
                    parts[id(v)] = v
        by_reader: dict[int, tuple[Reader, list[int]]] = {}
        for i, p in parts.items():
            by_reader.setdefault(id(p.reader), (p.reader, []))[1].append(i)
        got: dict[int, torch.Tensor] = {}
        for reader, ids in by_reader.values():
            got.update(zip(ids, reader.load([parts[i] for i in ids], "cpu")))
        out = []
        for r in refs:
            comps = {k: (got[id(v)] if isinstance(v, TensorRef) else v)
                     for k, v in r.components.items()}  # type: ignore[attr-defined]
            t = _torchao(r, comps) if r.cls_name else _torch_q(r, comps)  # type: ignore[attr-defined]
            out.append(t.to(device) if torch.device(device).type != "cpu" else t)
        return out


LOADER = QuantizedLoader()


def _torch_q(ref: QuantizedRef, c: dict[str, Any]) -> torch.Tensor:
    ints, q = c["int_repr"], c["qscheme"]
    if q in ("per_tensor_affine", "per_tensor_symmetric"):
        return torch._make_per_tensor_quantized_tensor(ints, c["scale"], c["zero_point"])
    return torch._make_per_channel_quantized_tensor(ints, c["scale"], c["zero_point"], c["axis"])


def _torchao(ref: QuantizedRef, c: dict[str, Any]) -> torch.Tensor:
    cls = torchao_class(ref.cls_name or "")
    stride = ref.stride if ref.stride is not None else None
    t = torch._utils._rebuild_wrapper_subclass(cls, ref.dtype, torch.Size(ref.shape), stride,
                                               ref.offset, torch.strided, torch.device("cpu"),
                                               ref.requires_grad)
    for k, v in c.items():
        setattr(t, k, _rebuild_data(v))
    return t


def torchao_class(name: str) -> type:
    """The torchao tensor class ``name`` (only those on the list; torchao must be installed)."""
    if name not in TORCHAO_CLASSES:
        raise FormatError(f"{name} is not on torchkeep's list of torchao data tensor classes")
    obj = _import(name)
    if not (isinstance(obj, type) and issubclass(obj, torch.Tensor)):
        raise FormatError(f"{name} is not a tensor class")
    return obj


def qtensor_ref(storage_ref: TensorRef, quantizer_params: Any, requires_grad: bool) -> Any:
    """The ref for ``torch._utils._rebuild_qtensor``: the integer values as a ref into the same
    storage, with the scheme's scales and zero points."""
    qscheme = quantizer_params[0]
    int_dtype = INT_REPR.get(storage_ref.dtype)
    if int_dtype is None:
        return None
    ints = replace(storage_ref, dtype=int_dtype)
    name = _scheme_name(qscheme)
    comps: dict[str, Any] = {"int_repr": ints, "qscheme": name}
    if name in ("per_tensor_affine", "per_tensor_symmetric"):
        comps.update(scale=float(quantizer_params[1]), zero_point=int(quantizer_params[2]))
        scheme = f"{name} scale={comps['scale']:g} zero_point={comps['zero_point']}"
    elif name.startswith("per_channel"):
        comps.update(scale=quantizer_params[1], zero_point=quantizer_params[2],
                     axis=int(quantizer_params[3]))
        scheme = f"{name} axis={comps['axis']}"
    else:
        return None
    return QuantizedRef(shape=storage_ref.shape, dtype=storage_ref.dtype, reader=LOADER,
                        key=None, storage=None, stride=storage_ref.stride,
                        requires_grad=bool(requires_grad), location=storage_ref.location,
                        scheme=scheme, components=comps)


@dataclass
class WrapperShell:
    """What ``torch._utils._rebuild_wrapper_subclass`` describes before its state is set."""

    cls_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None
    offset: int
    requires_grad: bool


def torchao_ref(shell: WrapperShell, state: Any) -> Any:
    """The ref for a torchao tensor: its pickled state's tensors become components."""
    if shell.cls_name not in TORCHAO_CLASSES or not isinstance(state, dict):
        return None
    if not _data_ok(state):
        return None
    comps = dict(state)
    base = comps.get("qdata")
    inner = ", ".join(f"{k} {tuple(v.shape)}" for k, v in comps.items() if isinstance(v, TensorRef))
    label = str(base.dtype).replace("torch.", "") if isinstance(base, TensorRef) else "?"
    scheme = f"{shell.cls_name.rpartition('.')[2]} ({label}: {inner})"
    return QuantizedRef(shape=shell.shape, dtype=shell.dtype, reader=LOADER, key=None,
                        storage=None, stride=shell.stride, offset=shell.offset,
                        requires_grad=shell.requires_grad, scheme=scheme, components=comps,
                        cls_name=shell.cls_name)


def dequantize(t: Any) -> Any:
    """A float copy of a quantized tensor (torch or torchao); other values unchanged."""
    if isinstance(t, torch.Tensor) and (t.is_quantized or (type(t) is not torch.Tensor and
                                                           hasattr(t, "dequantize")
                                                           and not isinstance(t, torch.nn.Parameter))):
        return t.dequantize()
    if isinstance(t, tuple):
        return tuple(dequantize(x) for x in t)
    return t
