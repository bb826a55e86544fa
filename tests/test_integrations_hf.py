"""The transformers Trainer and accelerate with torchkeep's sealed checkpoint folders: a tiny
model trained on CPU, SIGKILLed in the middle of a save (in forked children), resumed from
``last_good_checkpoint`` and ending bit-identical to a run that was never interrupted; damaged
and unsealed folders skipped with a warning; rotation that never leaves the run without a good
checkpoint; ``torchkeep verify``/``ls`` on those folders."""
from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")

from conftest import forked

from torchkeep.integrations import sealed  # noqa: E402
from torchkeep.integrations.transformers import (TorchkeepCallback,  # noqa: E402
                                                 last_good_checkpoint)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)




# -- the transformers Trainer ---------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.out = torch.nn.Linear(16, 2)

    def forward(self, x, labels=None):
        logits = self.out(self.drop(torch.relu(self.inp(x))))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _dataset(n: int = 20) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def hf_train(out_dir: str, result: str, kill: str = "", kill_at: int = 0, steps: int = 12,
             limit: int | None = 1) -> None:
    """Train TinyNet with the Trainer for ``steps`` (5 batches an epoch, a save every 4 steps),
    resuming from the last good checkpoint; ``kill`` names where the kill_at-th save dies."""
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    saves = {"n": 0}
    if kill == "mid-save":      # model written, optimizer written, RNG state not yet
        orig = Trainer._save_rng_state

        def dying(self, output_dir):
            saves["n"] += 1
            if saves["n"] == kill_at:
                _die()
            return orig(self, output_dir)
        Trainer._save_rng_state = dying
    elif kill == "before-seal":  # the Trainer finished (and would have rotated), not yet sealed
        orig_seal = sealed.seal

        def dying_seal(folder, **kw):
            saves["n"] += 1
            if saves["n"] == kill_at:
                _die()
            return orig_seal(folder, **kw)
        sealed.seal = dying_seal
    args = TrainingArguments(out_dir, max_steps=steps, per_device_train_batch_size=4, save_steps=4,
                             save_total_limit=limit, logging_steps=1000, report_to=[], use_cpu=True,
                             seed=3, data_seed=3, disable_tqdm=True, dataloader_num_workers=0,
                             learning_rate=0.05)
    transformers.set_seed(3)
    trainer = Trainer(model=TinyNet(), args=args, train_dataset=_dataset(),
                      callbacks=[TorchkeepCallback()])
    trainer.train(resume_from_checkpoint=last_good_checkpoint(out_dir))
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, result)


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-ref")
    assert forked(hf_train, str(d / "out"), str(d / "final.pt"), "", 0, 12, None) == 0
    return str(d / "out"), torch.load(str(d / "final.pt"))


def _same(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_every_checkpoint_is_sealed_and_verifies(hf_reference):
    out, _ = hf_reference
    folders = sealed.candidates(out, "checkpoint-")
    assert [os.path.basename(f) for f in folders] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    for f in folders:
        i = sealed.verify(f)
        assert i.status == "ok", i.problems
        manifest = json.load(open(os.path.join(f, sealed.MANIFEST)))
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest["files"])
    assert last_good_checkpoint(out).endswith("checkpoint-12")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["mid-save", "before-seal"])
def test_killed_mid_save_resumes_from_the_last_good_and_ends_bit_identical(tmp_path, hf_reference, kill):
    _, ref = hf_reference
    out, result = str(tmp_path / "out"), str(tmp_path / "final.pt")
    assert forked(hf_train, out, result, kill, 2) == -signal.SIGKILL     # dies saving step 8
    names = sorted(os.listdir(out))
    assert "checkpoint-4" in names and "checkpoint-8" in names, names   # limit 1: 4 still kept
    assert sealed.verify(os.path.join(out, "checkpoint-4")).status == "ok"
    assert not sealed.is_sealed(os.path.join(out, "checkpoint-8"))
    with pytest.warns(UserWarning, match="checkpoint-8.*uncommitted"):
        assert last_good_checkpoint(out).endswith("checkpoint-4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forked(hf_train, out, result) == 0
    assert not _same(ref, torch.load(result)), _same(ref, torch.load(result))
    # save_total_limit=1: only the newest sealed checkpoint is left, and it verifies.
    assert [os.path.basename(f) for f in sealed.candidates(out, "checkpoint-")] == ["checkpoint-12"]
    assert sealed.verify(os.path.join(out, "checkpoint-12")).status == "ok"


def test_damaged_and_truncated_folders_are_skipped_with_a_warning(tmp_path, hf_reference):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(hf_reference[0], out)
    newest = os.path.join(out, "checkpoint-12")
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:   # a flipped byte
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    mid = os.path.join(out, "checkpoint-8")
    with open(os.path.join(mid, "optimizer.pt"), "r+b") as f:          # truncated
        f.truncate(10)
    with pytest.warns(UserWarning) as rec:
        assert last_good_checkpoint(out).endswith("checkpoint-4")
    msgs = [str(w.message) for w in rec]
    assert any("checkpoint-12" in m and "xxh3_128 is" in m for m in msgs), msgs
    assert any("checkpoint-8" in m and "optimizer.pt" in m and "bytes" in m for m in msgs), msgs
    os.remove(os.path.join(out, "checkpoint-4", "trainer_state.json"))   # a missing file
    with pytest.warns(UserWarning, match="trainer_state.json: missing"):
        assert last_good_checkpoint(out) is None


def test_rotation_never_deletes_the_newest_good_or_a_protected_one(tmp_path):
    for s in (1, 2, 3, 4):
        f = tmp_path / f"checkpoint-{s}"
        f.mkdir()
        (f / "w.bin").write_bytes(bytes([s]) * 10)
        if s != 4:
            sealed.seal(f)
    (tmp_path / "checkpoint-0").mkdir()        # an interrupted save, older than the newest sealed
    removed = sealed.rotate(tmp_path, "checkpoint-", 1, protect=[str(tmp_path / "checkpoint-1")])
    assert sorted(os.path.basename(r) for r in removed) == ["checkpoint-0", "checkpoint-2"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


def _cli_here(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """The CLI in this process (one subprocess test is enough to cover the entry point)."""
    from torchkeep.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_cli_verify_and_ls_understand_trainer_folders(tmp_path, hf_reference, cli, capsys, monkeypatch):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(hf_reference[0], out)
    code, text = _cli_here(capsys, monkeypatch, "verify", os.path.join(out, "checkpoint-8"))
    assert code == 0 and "all 1 good" in text, text
    with open(os.path.join(out, "checkpoint-8", "model.safetensors"), "ab") as f:
        f.write(b"x")
    p = cli("verify", out, "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    got = {os.path.basename(c["path"]): c["status"] for c in json.loads(p.stdout)["checkpoints"]}
    assert got == {"checkpoint-4": "ok", "checkpoint-8": "damaged", "checkpoint-12": "ok"}
    code, text = _cli_here(capsys, monkeypatch, "ls", out)
    assert code == 0 and "12" in text and "ok (latest)" in text, text   # ls reads commit records only


# -- accelerate ------------------------------------------------------------------------------------

def acc_train(project: str, result: str, kill_at: int = 0, steps: int = 18) -> None:
    """A plain accelerate loop saving at each epoch's end (6 steps) with automatic naming
    (total_limit=2). At epoch ends because a DataLoader draws its base seed from the global RNG
    when its iterator is made: a loop resumed inside an epoch (``skip_first_batches``) makes a
    new iterator and shifts the dropout stream (torchkeep's own TrainState.batches() does not)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    from torchkeep.integrations import accelerate as tk

    torch.set_num_threads(1)
    set_seed(11)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project, automatic_checkpoint_naming=True, total_limit=2),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _dataset(24)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    model, opt, loader = acc.prepare(model, opt, loader)
    acc.register_for_checkpointing(_Counter := _Steps())
    if kill_at:
        orig = sealed.seal
        n = {"n": 0}

        def dying(folder, **kw):
            n["n"] += 1
            if n["n"] == kill_at:
                _die()
            return orig(folder, **kw)
        sealed.seal = dying
    tk.load_state(acc)
    done = _Counter.step
    epoch, skip = divmod(done, len(loader))
    while done < steps:
        acc_loader = acc.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        loader.set_epoch(epoch)   # the seedable sampler draws each epoch's order from seed + epoch
        for batch in acc_loader:
            loss = model(**batch)["loss"]
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
            done += 1
            _Counter.step = done
            if done % len(loader) == 0:
                tk.save_state(acc)
            if done >= steps:
                break
        epoch += 1
    torch.save({k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}, result)


class _Steps:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.step = sd["step"]


@pytest.mark.slow
def test_accelerate_save_state_sealed_rotated_and_resumed(tmp_path):
    accelerate = pytest.importorskip("accelerate", reason="needs accelerate")  # noqa: F841
    from torchkeep.integrations import accelerate as tk

    ref = str(tmp_path / "ref.pt")
    assert forked(acc_train, str(tmp_path / "ref"), ref) == 0
    ck = tmp_path / "ref" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["checkpoint_1", "checkpoint_2"]    # total_limit=2 of 3 saves
    assert all(sealed.verify(ck / n).status == "ok" for n in os.listdir(ck))
    project, out = str(tmp_path / "run"), str(tmp_path / "out.pt")
    assert forked(acc_train, project, out, 2) == -signal.SIGKILL   # dies sealing the 2nd save
    assert tk.last_good_checkpoint(project).endswith("checkpoint_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert forked(acc_train, project, out) == 0
    got, want = torch.load(out), torch.load(ref)
    assert not _same(want, got), _same(want, got)
    names = sorted(os.listdir(os.path.join(project, "checkpoints")))
    assert names == ["checkpoint_1", "checkpoint_2"], names
