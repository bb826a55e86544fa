"""A corpus of hostile and benign files, generated (never downloaded): every class of input
issue 11 names. A malicious payload only creates a marker file, so a test can tell whether it ran.

``malicious(tmp, marker)`` and ``benign(tmp)`` return ``{name: (path, expected globals)}``;
expected globals are names the scan must list as unsafe or unknown.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
import zlib

import torch

MAGIC = 0x1950A86A20F9469CFC6C


class Payload:
    """Pickles to ``os.system('touch <marker>')``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class TrainingArgs:
    """Stands for transformers' TrainingArguments: a class torch.load would import."""

    def __init__(self) -> None:
        self.lr = 0.1


def _su(s: str) -> bytes:  # SHORT_BINUNICODE
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _exec_code(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


def raw_pickles(marker: str) -> dict[str, tuple[bytes, list[str]]]:
    """Hand-written pickles in every dialect; each runs the payload under pickle.loads (or
    names an unsafe global that would be imported)."""
    cmd = f"touch {marker}"
    code = _exec_code(marker)
    p2 = pickle.dumps(Payload(marker), protocol=2)
    p4 = pickle.dumps(Payload(marker), protocol=4)
    frame_short = bytearray(p4)
    assert frame_short[2] == 0x95
    frame_short[3:11] = struct.pack("<Q", 3)  # the frame says 3 bytes, the opcodes run on
    stack_global_memo = (b"\x80\x04" + _su("builtins") + b"\x94" + _su("exec") + b"\x94"
                         + b"h\x00h\x01\x93" + _su(code) + b"\x85R.")
    dup_names = (b"\x80\x04" + _su("builtins") + b"2" + b"0" + _su("exec") + b"\x93"
                 + _su(code) + b"\x85R.")
    return {
        "p0_global": (f"cos\nsystem\n(S'{cmd}'\ntR.".encode(), ["posix.system", "os.system"]),
        "p0_inst": (f"(S'{cmd}'\nios\nsystem\n.".encode(), ["os.system", "posix.system"]),
        "p1_obj": (f"(cos\nsystem\nS'{cmd}'\no.".encode(), ["os.system", "posix.system"]),
        "p1_binstring": (b"cbuiltins\nexec\n(U" + bytes([len(code)]) + code.encode() + b"tR.",
                         ["builtins.exec"]),
        "p2_reduce": (p2, ["posix.system"]),
        "p3_exec": (pickle.dumps(ExecPayload(marker), protocol=3), ["builtins.exec"]),
        "p4_stack_global": (p4, ["posix.system"]),
        "p4_memo_names": (stack_global_memo, ["builtins.exec"]),
        "p4_dup_names": (dup_names, ["builtins.exec"]),
        "p5_exec": (pickle.dumps(ExecPayload(marker), protocol=5), ["builtins.exec"]),
        "frame_disagrees": (bytes(frame_short), ["posix.system"]),
        "broken_after_payload": (p2[:-1] + b"\xff\xfe garbage", ["posix.system"]),
        "newobj_popen": (b"\x80\x02csubprocess\nPopen\n)\x81.", ["subprocess.Popen"]),
        "newobj_ex_popen": (b"\x80\x04" + _su("subprocess") + _su("Popen") + b"\x93)}\x92.",
                            ["subprocess.Popen"]),
        "ext_code": (b"\x80\x02\x82\x05)R.", ["?.extension code 5"]),
        "computed_name": (b"\x80\x04" + _su("builtins") + _su("str") + b"\x93" + _su("os")
                          + b"\x85R" + _su("system") + b"\x93" + _su(cmd) + b"\x85R.", ["?.?"]),
        # Only allowlisted names: a lookup helper's answer called as a function.
        "layout_gadget": (b"\x80\x04" + _su("torch.serialization") + _su("_get_layout") + b"\x93"
                          + _su("torch.save") + b"\x85R" + b"}" + _su(marker) + b"\x86R.",
                          ["?.call of a value computed at load time"]),
    }


def _patch_member(data: bytes, member: str, fn) -> bytes:
    """Apply ``fn(buf, local_offset, central_offset)`` to the headers of ``member``."""
    buf = bytearray(data)
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = zf.getinfo(member)
    central = -1
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        nlen = struct.unpack("<H", data[pos + 28:pos + 30])[0]
        if data[pos + 46:pos + 46 + nlen].decode() == member:
            central = pos
            break
        pos = data.find(b"PK\x01\x02", pos + 4)
    fn(buf, info.header_offset, central)
    return bytes(buf)


def _zip_with(tmp: str, name: str, members: list[tuple[str, bytes]]) -> str:
    path = os.path.join(tmp, name)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names on purpose
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for n, d in members:
                z.writestr(n, d)
    return path


def _benign_archive() -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return [(i.filename, z.read(i)) for i in z.infolist()]


def _evil_archive(evil: bytes) -> list[tuple[str, bytes]]:
    members = _benign_archive()
    prefix = members[0][0].split("/")[0]
    return [(n, evil if n == f"{prefix}/data.pkl" else d) for n, d in members], prefix


def legacy_file(object_pickle: bytes) -> bytes:
    return (pickle.dumps(MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
            + object_pickle + pickle.dumps([], protocol=2))


def malicious(tmp: str, marker: str) -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    raws = raw_pickles(marker)
    for name, (data, expect) in raws.items():
        path = os.path.join(tmp, f"{name}.pkl")
        with open(path, "wb") as f:
            f.write(data)
        out[f"pkl_{name}"] = (path, expect)
    p2, p2_expect = raws["p2_reduce"]
    p0, p0_expect = raws["p0_global"]
    # torch's own writers
    path = os.path.join(tmp, "torch_zip.pt")
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, path)
    out["torch_zip"] = (path, ["posix.system"])
    path = os.path.join(tmp, "torch_legacy.pt")
    torch.save({"w": torch.ones(2), "evil": ExecPayload(marker)}, path, _use_new_zipfile_serialization=False)
    out["torch_legacy"] = (path, ["builtins.exec"])
    # legacy files with protocol 0/1 pickles, and one whose first pickle starts with '('
    for name, data in (("legacy_p0_object", legacy_file(p0)), ("legacy_paren_first", raws["p0_inst"][0]),
                       ("legacy_p1_obj", legacy_file(raws["p1_obj"][0]))):
        path = os.path.join(tmp, f"{name}.pt")
        with open(path, "wb") as f:
            f.write(data)
        out[name] = (path, ["os.system", "posix.system"])
    # tar-era
    path = os.path.join(tmp, "tar_era.pt")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for n, d in (("sys_info", pickle.dumps({"little_endian": True}, 2)),
                     ("storages", pickle.dumps(0, 2) + pickle.dumps([], 2)),
                     ("tensors", pickle.dumps(0, 2)), ("pickle", p2)):
            ti = tarfile.TarInfo(n)
            ti.size = len(d)
            t.addfile(ti, io.BytesIO(d))
    out["tar_era"] = (path, ["posix.system"])
    # zip tricks
    members, prefix = _evil_archive(p2)
    benign = dict(_benign_archive())
    pkl = f"{prefix}/data.pkl"
    out["zip_case_names"] = (_zip_with(tmp, "case.pt", [*_benign_archive(), (pkl.upper(), p2)]),
                             ["posix.system"])
    out["zip_duplicate_names"] = (_zip_with(tmp, "dup.pt", [*_benign_archive(), (pkl, p2)]),
                                  ["posix.system"])
    evil_zip = open(_zip_with(tmp, "base_evil.pt", members), "rb").read()

    def rename_local(buf, local, central):
        n = struct.unpack("<H", buf[local + 26:local + 28])[0]
        buf[local + 30 + n - 1:local + 30 + n] = b"X"
    for name, fn in (
        ("zip_local_name_differs", rename_local),
        *[(f"zip_flag_{bit:#x}", (lambda b: lambda buf, lo, ce: (
            struct.pack_into("<H", buf, lo + 6, struct.unpack("<H", buf[lo + 6:lo + 8])[0] | b),
            struct.pack_into("<H", buf, ce + 8, struct.unpack("<H", buf[ce + 8:ce + 10])[0] | b)))(bit))
          for bit in (0x1, 0x20, 0x40)],
        ("zip_bad_crc", lambda buf, lo, ce: (struct.pack_into("<I", buf, lo + 14, 0xDEADBEEF),
                                             struct.pack_into("<I", buf, ce + 16, 0xDEADBEEF))),
    ):
        path = os.path.join(tmp, f"{name}.pt")
        with open(path, "wb") as f:
            f.write(_patch_member(evil_zip, pkl, fn))
        out[name] = (path, ["posix.system"])
    path = os.path.join(tmp, "zip_trailing.pt")
    with open(path, "wb") as f:
        f.write(evil_zip + b"\x00trailing junk" * 100)
    out["zip_trailing"] = (path, ["posix.system"])
    path = os.path.join(tmp, "zip_deflated.pt")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in members:
            z.writestr(n, d)
    out["zip_deflated"] = (path, ["posix.system"])
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("inner/data.pkl", raws["p3_exec"][0])
    out["zip_nested"] = (_zip_with(tmp, "nested.pt", [*benign.items(), (f"{prefix}/extra/x.zip", inner.getvalue())]),
                         ["builtins.exec"])
    # numpy object arrays
    import numpy as np
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    path = os.path.join(tmp, "objects.npy")
    np.save(path, arr, allow_pickle=True)
    out["npy_object"] = (path, ["posix.system"])
    path = os.path.join(tmp, "objects.npz")
    np.savez(path, a=arr, b=np.zeros(3))
    out["npz_object"] = (path, ["posix.system"])
    # any name: a torch file called .bin, a plain pickle called .dat
    path = os.path.join(tmp, "pytorch_model.bin")
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, path)
    out["bin_name"] = (path, ["posix.system"])
    # folders: an HF sharded folder with a malicious shard; weights beside training_args.bin
    out.update(_folders(tmp, marker))
    try:
        import py7zr
        path = os.path.join(tmp, "packed.7z")
        with py7zr.SevenZipFile(path, "w") as z:
            z.writestr(p2, "evil.pkl")
        out["sevenz"] = (path, ["posix.system"])
    except ImportError:
        pass
    return out


def _folders(tmp: str, marker: str) -> dict[str, tuple[str, list[str]]]:
    from safetensors.torch import save_file

    out = {}
    hf = os.path.join(tmp, "hf_sharded")
    os.makedirs(hf)
    torch.save({"a": torch.ones(2)}, os.path.join(hf, "pytorch_model-00001-of-00002.bin"))
    torch.save({"b": torch.ones(2), "evil": Payload(marker)}, os.path.join(hf, "pytorch_model-00002-of-00002.bin"))
    with open(os.path.join(hf, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                                  "b": "pytorch_model-00002-of-00002.bin"}}, f)
    out["hf_sharded_folder"] = (hf, ["posix.system"])
    run = os.path.join(tmp, "hf_run")
    os.makedirs(run)
    save_file({"w": torch.ones(2)}, os.path.join(run, "model.safetensors"))
    torch.save(TrainingArgs(), os.path.join(run, "training_args.bin"))
    out["training_args_beside_weights"] = (run, [f"{TrainingArgs.__module__}.TrainingArgs"])
    return out


def benign(tmp: str) -> dict[str, str]:
    """Data-only files of every format the scanner reads: each must scan safe (exit 0)."""
    import argparse

    import numpy as np
    from safetensors.torch import save_file

    out = {}
    sd = {"w": torch.randn(3, 2), "b": torch.zeros(3, dtype=torch.bfloat16), "step": 3,
          "names": ["a", "b"], "t": (1, 2.5, None, True), "s": {1, 2}, "by": b"xy"}

    def put(name: str, fn) -> None:
        path = os.path.join(tmp, name)
        fn(path)
        out[name] = path
    put("zip.pt", lambda p: torch.save(sd, p))
    put("zip_p4.pt", lambda p: torch.save(sd, p, pickle_protocol=4))
    put("legacy.pt", lambda p: torch.save(sd, p, _use_new_zipfile_serialization=False))
    put("module_state.pt", lambda p: torch.save(torch.nn.Linear(2, 3).state_dict(), p))
    put("optimizer.pt", lambda p: torch.save(torch.optim.Adam(torch.nn.Linear(2, 2).parameters()).state_dict(), p))
    put("numpy_inside.pt", lambda p: torch.save({"a": np.arange(4.0), "n": np.float32(2)}, p, ))
    put("timm_args.pt", lambda p: torch.save({"state_dict": {"w": torch.ones(1)},
                                             "args": argparse.Namespace(lr=0.1, model="x")}, p))
    for proto in range(6):
        put(f"plain_p{proto}.pkl", lambda p, proto=proto: open(p, "wb").write(
            pickle.dumps({"a": [1, 2.5, "x"], "b": (None, True), "c": {"k": b"v"}}, protocol=proto)))
    import random
    put("rng_state.pth", lambda p: torch.save({  # what transformers' Trainer writes beside weights
        "python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state(),
        "legacy": np.random.RandomState(3)}, p))
    put("plain.npy", lambda p: np.save(p, np.arange(10)))
    put("plain.npz", lambda p: np.savez(p, a=np.arange(3), b=np.ones((2, 2))))
    put("weights.safetensors", lambda p: save_file({"w": torch.ones(2)}, p))
    put("deflated.pt", lambda p: _deflate(_benign_archive(), p))
    try:
        import py7zr
        buf = io.BytesIO()
        torch.save(sd, buf)
        put("packed.7z", lambda p: _seven(py7zr, p, buf.getvalue()))
    except ImportError:
        pass
    return out


def _deflate(members, path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in members:
            z.writestr(n, d)


def _seven(py7zr, path, data):
    with py7zr.SevenZipFile(path, "w") as z:
        z.writestr(data, "model.pt")


__all__ = ["malicious", "benign", "raw_pickles", "Payload", "ExecPayload", "legacy_file", "zlib"]
