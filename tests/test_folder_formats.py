"""Folders written by the real libraries (tiny configs, nothing downloaded): diffusers pipelines,
sentence-transformers, tensordict memmap, transformers Trainer and accelerate save_state."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import torchkeep
from conftest import run_cli

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.slow


def _need(module: str):
    try:
        return __import__(module)
    except Exception as e:  # an installed library that fails to import is a skip, said why
        pytest.skip(f"{module} cannot be imported here: {type(e).__name__}: {e}")


def _tiny_bert(folder):
    _need("transformers")
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "hello"]))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    BertModel(cfg).save_pretrained(folder)
    BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return cfg


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sentence_transformers_every_module(tmp_path):
    _need("sentence_transformers")
    from sentence_transformers import SentenceTransformer, models

    _tiny_bert(tmp_path / "bert")
    tr = models.Transformer(str(tmp_path / "bert"))
    st = SentenceTransformer(modules=[tr, models.Pooling(8), models.Dense(8, 4)], device="cpu")
    st.save(str(tmp_path / "st"))
    ref = SentenceTransformer(str(tmp_path / "st"), device="cpu").state_dict()
    with torchkeep.open(tmp_path / "st") as ck:
        assert ck.format == "sentence-transformers"
        sd = ck.state_dict()
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
        assert "2.linear.weight" in sd  # the Dense module is not dropped
    out = run_cli("inspect", str(tmp_path / "st"), check=True).stdout
    assert f"model: {_params(st):,} parameters" in out, out


def test_diffusers_pipeline_one_entry_per_component(tmp_path):
    _need("diffusers")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "pipe"))
    loaded = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    ref = {f"unet.{k}": v for k, v in loaded.unet.state_dict().items()}
    with torchkeep.open(tmp_path / "pipe") as ck:
        assert ck.format == "diffusers" and set(ck.tree) == {"unet", "model_index"}
        assert ck.metadata["config only"] == "scheduler"
        sd = ck.state_dict()
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    p = run_cli("inspect", str(tmp_path / "pipe"), "--depth", "1", check=True)
    assert f"model: {_params(unet):,} parameters" in p.stdout
    assert "unet" in p.stdout


def test_tensordict_memmap(tmp_path):
    _need("tensordict")
    from tensordict import TensorDict

    td = TensorDict({"a": torch.arange(6.).reshape(2, 3), "flag": torch.tensor([True, False]),
                     "nested": TensorDict({"b": torch.ones(2, 2, dtype=torch.int64)}, [2])}, [2])
    td.memmap(str(tmp_path / "td"))
    back = TensorDict.load_memmap(str(tmp_path / "td"))
    ref = {".".join(k) if isinstance(k, tuple) else k: v for k, v in back.items(True, True)}
    with torchkeep.open(tmp_path / "td") as ck:
        assert ck.format == "tensordict"
        got = ck.state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_accelerate_save_state_as_a_whole(tmp_path):
    _need("accelerate")
    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters())
    sch = torch.optim.lr_scheduler.StepLR(opt, 2)
    model, opt, sch = acc.prepare(model, opt, sch)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sch.step()
    acc.save_state(str(tmp_path / "state"))
    with torchkeep.open(tmp_path / "state") as ck:
        assert ck.format == "training-folder" and ck.summary.kind == "accelerate"
        assert {"model", "optimizer", "scheduler", "rng"} <= set(ck.tree)
        sd = ck.state_dict()
        ref = model.state_dict()
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
        assert ck.tree["scheduler"]["last_epoch"] == 1
    out = run_cli("inspect", str(tmp_path / "state"), check=True).stdout
    assert f"model: {_params(model)} parameters" in out, out
    assert "scheduler 'scheduler': last_epoch=1" in out
    # safetensors sorts names, so optimizer ids are not given names by position
    assert "by index" in out


def test_trainer_checkpoint_folder_as_a_whole(tmp_path):
    _need("transformers")
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(cfg)
    data = [{"input_ids": torch.tensor([2, 5, 6, 3]), "labels": torch.tensor(1)} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    folder = tmp_path / "out" / "checkpoint-2"
    ref = BertForSequenceClassification.from_pretrained(str(folder)).state_dict()
    with torchkeep.open(folder) as ck:
        assert ck.format == "training-folder" and ck.summary.kind == "trainer"
        assert {"model", "optimizer", "scheduler", "rng", "trainer_state", "training_args"} <= set(ck.tree)
        assert ck.tree["trainer_state"]["global_step"] == 2
        sd = ck.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in sd) and set(sd) <= set(ref)
    p = run_cli("inspect", str(folder), "--json", check=True)
    data = json.loads(p.stdout)
    assert data["model"]["parameters"] == _params(model)
    assert data["progress"]["trainer_state.global_step"] == 2
    assert data["optimizer"][0]["family"] == "Adam-style"
    assert data["safe"] is False  # training_args.bin needs transformers' classes to load
