"""Malicious and odd pickles: nothing from the file runs; scan names every global."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch

import torchkeep
from torchkeep.read.scanner import scan_pickle
from torchkeep.read.unpickler import classify


class Payload:
    """Pickles to a call that creates a marker file: the test checks the file never appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


def _evil_checkpoint(tmp_path, payload_cls=Payload, protocol=2):
    marker = tmp_path / "PWNED"
    obj = {"weight": torch.ones(3), "evil": payload_cls(str(marker))}
    path = tmp_path / "evil.pt"
    torch.save(obj, path, pickle_protocol=protocol)
    return path, marker


@pytest.mark.parametrize("payload_cls,bad", [(Payload, "posix.system"), (EvalPayload, "builtins.eval")])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_file_opens_without_running(tmp_path, payload_cls, bad, protocol):
    path, marker = _evil_checkpoint(tmp_path, payload_cls, protocol)
    ck = torchkeep.open(path)
    assert [e.name for e in ck.entries()] == ["weight"]
    assert torch.equal(ck.tensors()["weight"], torch.ones(3))
    with pytest.raises(torchkeep.UnsafeCheckpointError) as err:
        ck.state_dict()  # the mapping holding the weights also holds the payload
    assert "evil" in str(err.value) and bad in err.value.globals
    with pytest.raises(torchkeep.UnsafeCheckpointError) as err:
        ck.load()
    assert bad in err.value.globals
    rep = torchkeep.scan(str(path))
    assert not rep.safe and bad in [g.qualname for g in rep.unsafe]
    assert not marker.exists()


def test_trust_is_the_only_door(tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    torchkeep.open(path, trust=True).load()
    assert marker.exists()  # trust=True really means torch.load semantics


def test_scan_finds_pickles_in_other_members_and_nested_archives(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "clean.pt")
    evil = pickle.dumps(Payload(str(tmp_path / "x")), protocol=2)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("inner/data.pkl", pickle.dumps(EvalPayload("y"), protocol=4))
    src = zipfile.ZipFile(tmp_path / "clean.pt")
    with zipfile.ZipFile(tmp_path / "mixed.pt", "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info, src.read(info))
        out.writestr("clean/extra/hook.pkl", evil)
        out.writestr("clean/extra/bundle.zip", inner.getvalue())
    rep = torchkeep.scan(str(tmp_path / "mixed.pt"))
    found = {(g.qualname, g.member) for g in rep.unsafe}
    assert ("posix.system", "clean/extra/hook.pkl") in found
    assert ("builtins.eval", "clean/extra/bundle.zip!inner/data.pkl") in found
    # the checkpoint's own pickle is still clean and opens
    assert torch.equal(torchkeep.open(tmp_path / "mixed.pt").state_dict()["w"], torch.zeros(2))


def test_stack_global_with_memoized_and_computed_names():
    # Protocol 4: STACK_GLOBAL from memoized strings, reusing the memo for a second global.
    data = (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"
            b"\x8c\x05posix\x94\x8c\x06system\x94\x93\x94"     # posix.system, memo 0,1,2
            b"h\x00\x8c\x05popen\x94\x93\x94"                  # BINGET 0 ('posix') + 'popen'
            b"\x8c\x02id\x94\x85\x94R\x94."                     # call -> leave result
            )
    found, err = scan_pickle(data)
    names = [g.qualname for g in found]
    assert "posix.system" in names and "posix.popen" in names
    # A module name computed at load time (the result of a call) cannot be checked: '?.?' unsafe.
    computed = (b"\x80\x04\x8c\x08builtins\x8c\x03str\x93\x8c\x02os\x85R"
                b"\x8c\x06system\x93.")
    found, _ = scan_pickle(computed)
    assert ("?.?", "unsafe") in [(g.qualname, g.verdict) for g in found]


def test_restricted_unpickler_never_imports(tmp_path, monkeypatch):
    import sys
    data = (b"\x80\x02ctorchkeep_never_imported_module\nThing\nq\x00)\x81q\x01}q\x02X\x01\x00\x00\x00aq\x03K\x01sb.")
    (tmp_path / "p.pkl").write_bytes(data)
    ck = torchkeep.open(tmp_path / "p.pkl")
    assert "torchkeep_never_imported_module" not in sys.modules
    obj = ck.tree
    assert obj.global_name == "torchkeep_never_imported_module.Thing" and obj.state == {"a": 1}
    assert torchkeep.scan(str(tmp_path / "p.pkl")).unknown[0].qualname == "torchkeep_never_imported_module.Thing"


@pytest.mark.parametrize("module,name,verdict", [
    ("torch._utils", "_rebuild_tensor_v2", "safe"), ("collections", "OrderedDict", "safe"),
    ("os", "system", "unsafe"), ("posix", "system", "unsafe"), ("subprocess", "Popen", "unsafe"),
    ("builtins", "exec", "unsafe"), ("builtins", "getattr", "unsafe"), ("__builtin__", "eval", "unsafe"),
    ("functools", "partial", "unsafe"), ("mymodels.net", "Net", "unknown"), ("torch", "bfloat16", "safe"),
    ("numpy.core.multiarray", "_reconstruct", "safe"), ("torch.nn.modules.linear", "Linear", "unknown"),
])
def test_classification(module, name, verdict):
    assert classify(module, name) == verdict


def test_numpy_arrays_are_data(tmp_path):
    np = pytest.importorskip("numpy")
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch.save({"arr": arr, "n": np.float64(2.5), "w": torch.ones(1)}, tmp_path / "np.pt", )
    ck = torchkeep.open(tmp_path / "np.pt")
    assert np.array_equal(ck.tree["arr"], arr) and ck.tree["n"] == 2.5
    assert torchkeep.scan(str(tmp_path / "np.pt")).safe


# --- no gadget in the allowlist ------------------------------------------------------------------

def _hostile_args():
    from torchkeep.read.allowlist import ALLOWED
    from torchkeep.read.placeholders import StorageRef, _placeholder

    evil_cls = _placeholder("os", "system")
    values = ["torch.save", "os.system", "builtins.exec", "torch.from_file", "torch.set_default_device",
              "cuda", "latin1", "rot13", "zlib", b"\x00" * 8, 10 ** 12, -1, 0, 2.5, None, True,
              range(10 ** 12), evil_cls, evil_cls(), torch.float32,
              StorageRef(None, "0", torch.float32, 10 ** 12, "cpu"),
              (10 ** 12,), [1, 2], {"__class__": "x"}, *ALLOWED.values()]
    singles = [(v,) for v in values]
    pairs = [(a, b) for a in values[:14] for b in values[:14]]
    wide = [(v, 0, (2 ** 40,), (1,), False, None, torch.float32) for v in values]
    return [()] + singles + pairs + wide + [(v, v, v, v) for v in values]


def test_allowlist_holds_only_builders_and_data():
    from torchkeep.read.allowlist import ALLOWED, Builder, TypeMarker
    from torchkeep.read.placeholders import Opaque, StorageType

    for name, value in ALLOWED.items():
        ok = isinstance(value, (Builder, TypeMarker, StorageType, torch.dtype, torch.layout,
                                torch.memory_format, torch.qscheme)) or (isinstance(value, type) and issubclass(value, Opaque))
        assert ok, f"{name} is allowlisted as {value!r}: only Builders and data may be"


def test_no_allowlisted_callable_reaches_a_function_outside_it(monkeypatch, tmp_path):
    """Every Builder, called with hostile arguments (names of torch.save & co, huge sizes, lazy
    ranges, other allowlisted values), returns data or refuses: nothing outside is called."""
    import builtins
    import sys
    import types

    from torchkeep.read.allowlist import ALLOWED, Builder
    from torchkeep.read.placeholders import Opaque

    import torchkeep.read.formats.quantized  # noqa: F401  (torchkeep's own, imported lazily by two Builders)

    called = []
    for owner, attr in ((torch, "save"), (torch, "load"), (torch, "from_file"),
                        (torch, "set_default_device"), (os, "system"), (builtins, "exec"),
                        (builtins, "eval"), (builtins, "open")):
        real = getattr(owner, attr)
        monkeypatch.setattr(owner, attr, lambda *a, _n=attr, _r=real, **k: (called.append(_n), _r(*a, **k))[1])
    modules = set(sys.modules)
    builders = [(n, v) for n, v in ALLOWED.items() if isinstance(v, Builder)]
    assert len(builders) >= 30
    args_list = _hostile_args()
    for name, fn in builders:
        for args in args_list:
            try:
                out = fn(*args)
            except Exception:
                continue  # refusing is fine
            if any(out is a for a in args):
                continue  # handed back what it was given (e.g. _rebuild_parameter): reaches nothing new
            assert not isinstance(out, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                                        types.ModuleType, Builder, type)), (name, args, out)
            assert not callable(out) or isinstance(out, Opaque), (name, args, out)
            if isinstance(out, (list, tuple, bytes, bytearray, str, dict, set, frozenset)):
                assert len(out) <= 5_000_000, (name, args)  # nothing huge materialized
    monkeypatch.undo()
    assert not called, f"allowlisted callables reached {called}"
    assert not set(sys.modules) - modules, set(sys.modules) - modules  # nothing imported


def test_layout_lookup_is_a_fixed_table():
    from torchkeep.read.allowlist import ALLOWED

    get_layout = ALLOWED["torch.serialization._get_layout"]
    assert get_layout("torch.strided") is torch.strided
    for name in ("torch.save", "save", "torch.from_file", "torch.set_default_device"):
        with pytest.raises(Exception):
            get_layout(name)


def test_gadget_pickle_made_of_allowlisted_names_does_not_run(tmp_path):
    import hostile_corpus as H

    marker = tmp_path / "MARKER"
    data, _ = H.raw_pickles(str(marker))["layout_gadget"]
    (tmp_path / "g.pkl").write_bytes(data)
    with pytest.raises(torchkeep.TorchkeepError):
        torchkeep.open(tmp_path / "g.pkl").tree
    assert not marker.exists()
    rep = torchkeep.scan(str(tmp_path / "g.pkl"))
    assert rep.verdict == "unsafe" and "?.call of a value computed at load time" in [g.qualname for g in rep.unsafe]


@pytest.mark.parametrize("protocol", range(6))
def test_machine_builds_what_pickle_builds(protocol):
    """The shared machine, in build mode, gives back what CPython's unpickler gives for data."""
    import collections

    from torchkeep.read.unpickler import restricted_loads

    obj = {"a": [1, -2, 2 ** 70, 2.5, "x" * 300, b"y", None, True, False], "t": (1, (2, 3), ()),
           "s": {1, 2}, "f": frozenset({3}), "o": collections.OrderedDict(k=[]), "ba": bytearray(b"z"),
           "c": complex(1, 2), "sl": slice(1, 2), "r": range(3)}
    shared = [1]
    obj["shared"] = (shared, shared)
    out = restricted_loads(pickle.dumps(obj, protocol=protocol))
    assert out == obj
    assert out["shared"][0] is out["shared"][1]


def test_scan_takes_a_path_object_like_a_string(tmp_path):
    import pathlib

    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    by_path, by_str = torchkeep.scan(pathlib.Path(path)), torchkeep.scan(str(path))
    assert by_path.safe and by_str.safe and by_path.verdict == by_str.verdict == "safe"
