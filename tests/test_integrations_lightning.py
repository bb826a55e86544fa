"""Lightning with TorchkeepCheckpointIO: real Trainer.fit on a tiny model on CPU; ModelCheckpoint
(top-k, last, save_weights_only) unchanged; a SIGKILL in the middle of a save (forked children)
and ``fit(ckpt_path="last")`` that falls back past the damaged last checkpoint and ends
bit-identical to an uninterrupted run; a frozen layer stored once; pickle refused by name;
asynchronous saving on its own and under AsyncCheckpointIO; the CLI on the result."""
from __future__ import annotations

import json
import os
import signal
import sys
import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs lightning")

from conftest import forked

from torchkeep.errors import StateError  # noqa: E402
from torchkeep.integrations.lightning import (TorchkeepCheckpointIO,  # noqa: E402
                                              load_from_checkpoint)
from torchkeep.read.formats import native  # noqa: E402

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
              pytest.mark.filterwarnings("ignore::UserWarning:lightning")]


class Opaque:
    """A hyperparameter value typed JSON cannot hold."""

    def __init__(self, n: int = 1) -> None:
        self.n = n


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.1, extra: object = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = torch.nn.Linear(8, 160 * 128 // 8, bias=False)   # 80 KiB, frozen
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(160 * 128 // 8, 2)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.head(torch.tanh(self.backbone(x))), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr,
                              momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)]


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(4)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 8, generator=g),
                                        torch.randint(0, 2, (40,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)     # 5 steps an epoch


def _trainer(d: str, io, epochs: int = 4, **ck) -> "pl.Trainer":
    ck = {"dirpath": d, "save_last": True, "save_top_k": 2, "monitor": "step", "mode": "max", **ck}
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, plugins=[io],
                      callbacks=[pl.callbacks.ModelCheckpoint(**ck)], deterministic=True)


def fit(d: str, result: str, kill: str = "", io_kind: str = "sync") -> None:
    torch.set_num_threads(1)
    if kill:
        what, n = kill.split(":")
        count = {"n": 0}
        if what == "last-commit":     # last.ckpt uncommitted and half rewritten
            orig = native.commit

            def dying(storage, folder, record):
                if folder.endswith("last.ckpt"):
                    count["n"] += 1
                    if count["n"] == int(n):
                        os.kill(os.getpid(), signal.SIGKILL)
                return orig(storage, folder, record)
            native.commit = dying
        elif what == "write":         # inside the n-th file write, after its first chunk
            from torchkeep.store import backends as store
            orig_w = store.LocalStorage.write_file

            def write_file(self, path, chunks, **kw):
                count["n"] += 1
                if count["n"] != int(n):
                    return orig_w(self, path, chunks, **kw)

                def die():
                    for c in chunks:
                        yield c
                        os.kill(os.getpid(), signal.SIGKILL)
                return orig_w(self, path, die(), **kw)
            store.LocalStorage.write_file = write_file
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    io = {"sync": TorchkeepCheckpointIO(), "own-async": TorchkeepCheckpointIO(async_save=True),
          "lightning-async": pl.plugins.io.AsyncCheckpointIO(TorchkeepCheckpointIO())}[io_kind]
    trainer = _trainer(d, io)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(model, _loader(), ckpt_path="last")
    with open(result + ".warnings", "w") as f:
        f.write("\n".join(str(w.message) for w in seen if "torchkeep" in str(w.message)))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, result)




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("lightning-ref")
    assert forked(fit, str(d / "ckpt"), str(d / "final.pt"), quiet=True) == 0
    return str(d / "ckpt"), torch.load(str(d / "final.pt"))


def test_model_checkpoint_top_k_and_last_as_committed_folders(reference):
    d, _ = reference
    names = sorted(os.listdir(d))
    assert names == ["blobs", "copies", "epoch=2-step=15.ckpt", "epoch=3-step=20.ckpt", "last.ckpt"], names
    for n in names[2:]:
        assert os.path.isdir(os.path.join(d, n))
        assert native.verify_folder(native.storage_for(d)[0], os.path.join(d, n)) == []
    # The frozen backbone is one blob shared by every checkpoint, also the removed ones'.
    assert len(os.listdir(os.path.join(d, "blobs"))) == 1
    assert os.listdir(os.path.join(d, "copies")) == os.listdir(os.path.join(d, "blobs"))  # its 2nd copy
    manifest = json.load(open(os.path.join(d, "last.ckpt", native.MANIFEST)))
    assert "pickle" not in json.dumps(manifest["state"])
    ck = TorchkeepCheckpointIO().load_checkpoint(os.path.join(d, "last.ckpt"))
    assert ck["global_step"] == 20 and ck["epoch"] == 3
    assert ck["hyper_parameters"] == {"lr": 0.1, "extra": None}
    assert ck["state_dict"]["backbone.weight"].shape == (160 * 16, 8)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["last-commit:3", "write:9"])
def test_killed_mid_save_resumes_from_last_and_ends_bit_identical(tmp_path, reference, kill):
    _, ref = reference
    d, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    assert forked(fit, d, out, kill, quiet=True) == -signal.SIGKILL
    assert not os.path.exists(out)
    assert forked(fit, d, out, quiet=True) == 0
    said = open(out + ".warnings").read()
    if kill.startswith("last-commit"):   # last.ckpt of step 15 half rewritten: its top-k twin
        assert "last.ckpt cannot be resumed from" in said and "epoch=2-step=15.ckpt" in said, said
    got = torch.load(out)
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    ck = TorchkeepCheckpointIO().load_checkpoint(os.path.join(d, "last.ckpt"))
    assert ck["global_step"] == 20


def test_load_from_checkpoint_gives_the_trained_module(reference):
    d, ref = reference
    model = load_from_checkpoint(Tiny, os.path.join(d, "last.ckpt"))
    assert isinstance(model, Tiny) and model.hparams.lr == 0.1
    got = model.state_dict()
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []


def test_import_torchkeep_imports_no_framework(tmp_path):
    import subprocess

    code = ("import sys, torchkeep; torchkeep.TrainState; torchkeep.CheckpointManager; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'transformers', "
            "'accelerate', 'pytorch_lightning', 's3fs') or m.startswith('torchkeep.integrations')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_damaged_last_falls_back_with_a_warning_other_paths_raise(tmp_path, reference):
    import shutil

    from torchkeep.errors import CorruptCheckpointError

    d = str(tmp_path / "ckpt")
    shutil.copytree(reference[0], d)
    pack = os.path.join(d, "last.ckpt", native.PACK)
    with open(pack, "r+b") as f:
        f.seek(os.path.getsize(pack) - 3)
        f.write(b"\xff\xff\xff")
    io = TorchkeepCheckpointIO()
    with pytest.warns(UserWarning, match=r"last.ckpt cannot be resumed from .*epoch=3-step=20.ckpt"):
        ck = io.load_checkpoint(os.path.join(d, "last.ckpt"))
    assert ck["global_step"] == 20
    shutil.copytree(os.path.join(d, "last.ckpt"), os.path.join(d, "copy.ckpt"))
    with pytest.raises(CorruptCheckpointError, match="xxh3|crc32|checksum"):
        io.load_checkpoint(os.path.join(d, "copy.ckpt"))


def test_pickle_refused_by_key_unless_allowed(tmp_path):
    torch.set_num_threads(1)
    model = Tiny(extra=Opaque(3))
    t = _trainer(str(tmp_path / "a"), TorchkeepCheckpointIO(), epochs=1)
    with pytest.raises(StateError, match=r"hyper_parameters\.extra.*trust=\['hyper_parameters'\]"):
        t.fit(model, _loader())
    t = _trainer(str(tmp_path / "b"), TorchkeepCheckpointIO(trust=["hyper_parameters"]), epochs=1)
    t.fit(model, _loader())
    ck = TorchkeepCheckpointIO(trust=["hyper_parameters"]).load_checkpoint(
        str(tmp_path / "b" / "last.ckpt"))
    assert isinstance(ck["hyper_parameters"]["extra"], Opaque) and ck["hyper_parameters"]["extra"].n == 3
    with pytest.raises(StateError, match="pickled"):
        TorchkeepCheckpointIO().load_checkpoint(str(tmp_path / "b" / "last.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("io_kind", ["own-async", "lightning-async"])
def test_async_saving_gives_the_same_checkpoints(tmp_path, reference, io_kind):
    d, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    assert forked(fit, d, out, "", io_kind, quiet=True) == 0
    assert sorted(os.listdir(d)) == sorted(os.listdir(reference[0]))
    io = TorchkeepCheckpointIO()
    a = io.load_checkpoint(os.path.join(d, "last.ckpt"))["state_dict"]
    b = io.load_checkpoint(os.path.join(reference[0], "last.ckpt"))["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_save_weights_only(tmp_path):
    torch.set_num_threads(1)
    t = _trainer(str(tmp_path), TorchkeepCheckpointIO(), epochs=1, save_weights_only=True)
    t.fit(Tiny(), _loader())
    ck = TorchkeepCheckpointIO().load_checkpoint(str(tmp_path / "last.ckpt"))
    assert "optimizer_states" not in ck and "backbone.weight" in ck["state_dict"]


@pytest.mark.slow
def test_cli_inspect_verify_ls_diff(reference, cli, capsys, monkeypatch):
    from torchkeep.cli import main

    d = reference[0]
    p = cli("verify", d)
    assert p.returncode == 0 and "all 3 good" in p.stdout, p.stdout + p.stderr

    def here(*args: str) -> tuple[int, str]:   # the rest in this process: seconds less each
        monkeypatch.setenv("COLUMNS", "200")
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr().out

    code, text = here("ls", d)
    assert code == 0 and "20" in text and "ok (latest)" in text, text
    code, text = here("inspect", os.path.join(d, "last.ckpt"))
    assert code == 0 and "backbone" in text and "model: 25,602 parameters" in text, text
    assert "optimizer 'optimizer_states.0': SGD-style" in text, text  # found inside the list
    assert "scheduler 'lr_schedulers.0'" in text, text
    code, text = here("diff", os.path.join(d, "epoch=2-step=15.ckpt"), os.path.join(d, "last.ckpt"))
    assert code in (0, 1) and "head.weight" in text, text


def test_allow_pickle_is_a_deprecated_alias_of_trust():
    with pytest.warns(DeprecationWarning, match=r"allow_pickle=\.\.\.\) is deprecated; use trust="):
        io = TorchkeepCheckpointIO(allow_pickle=["hyper_parameters"])
    assert io.trust == frozenset({"hyper_parameters"})
    assert TorchkeepCheckpointIO(trust=True).trust is True
