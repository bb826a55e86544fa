"""transfer gives the libraries' own results on the pairs users meet: each test loads the same
files with the library's loader and with torchkeep, and compares every tensor (tiny configs)."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from torchkeep import transfer

from _timm import import_timm


@pytest.fixture(autouse=True)
def quiet_libraries():
    for name in ("transformers", "timm", "lightning", "lightning.pytorch", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def assert_same_state(ours: nn.Module, theirs: nn.Module, atol: float = 0.0) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    for k in a:
        if atol:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k
        else:
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------- transformers
def _vit_config(**kw):
    transformers = pytest.importorskip("transformers")
    return transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, image_size=8, patch_size=4, **kw)


def test_vit_stored_names_load_through_the_library_mapping_or_structure(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.ViTModel(_vit_config()).save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.query.weight" in stored  # the stored names
    theirs = transformers.ViTModel.from_pretrained(tmp_path)

    ours = transformers.ViTModel(_vit_config())
    report = transfer(ours, tmp_path)
    assert report.ok, str(report)
    assert report.methods()["library"] == 32
    assert any(n.startswith("library key mapping: transformers ViTModel") for n in report.notes)
    assert_same_state(ours, theirs)

    # Without the library's mapping the structural matcher must get the same answer on its own
    # (safetensors keeps no order, and the two namings sort differently).
    plain = transformers.ViTModel(_vit_config())
    report = transfer(plain, tmp_path, library_keys=False)
    assert report.ok and "library" not in report.methods(), str(report)
    assert not report.notes
    assert_same_state(plain, theirs)


def test_sharded_index_keeps_no_order_and_still_loads_renamed(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torchkeep
    torch.manual_seed(10)
    transformers.ViTModel(_vit_config()).save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt = torchkeep.open(tmp_path)
    assert ckpt.format == "hf-sharded" and not ckpt.order_known
    theirs = transformers.ViTModel.from_pretrained(tmp_path)
    ours = transformers.ViTModel(_vit_config())
    report = transfer(ours, ckpt, library_keys=False)
    assert report.ok, str(report)
    assert_same_state(ours, theirs)


def test_legacy_gamma_beta_names_follow_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(1)
    sd = transformers.BertModel(cfg).state_dict()
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in sd.items()}
    (tmp_path / "m").mkdir()
    save_file(old, str(tmp_path / "m" / "model.safetensors"))
    cfg.save_pretrained(tmp_path / "m")
    theirs = transformers.BertModel.from_pretrained(tmp_path / "m")
    ours = transformers.BertModel(cfg)
    report = transfer(ours, tmp_path / "m" / "model.safetensors")
    assert report.ok, str(report)
    assert report.reasons["embeddings.LayerNorm.weight"] == \
        "library key mapping: embeddings.LayerNorm.gamma -> embeddings.LayerNorm.weight"
    assert_same_state(ours, theirs)


def test_gpt2_vocabulary_grown_like_resize_token_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")

    def config(vocab):
        return transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2)

    torch.manual_seed(2)
    transformers.GPT2LMHeadModel(config(40)).save_pretrained(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    theirs.resize_token_embeddings(52)  # new rows start at the old rows' mean (+1e-9 covariance noise)
    ours = transformers.GPT2LMHeadModel(config(52))
    report = transfer(ours, tmp_path)
    assert report.ok, str(report)
    assert "12 new rows set to the old rows' mean" in report.adapted["transformer.wte.weight"]
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()  # still tied
    assert_same_state(ours, theirs, atol=1e-5)
    # Untied output embeddings: the LM head's new rows start at the mean too.
    untied = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                     tie_word_embeddings=False)
    torch.manual_seed(3)
    transformers.GPT2LMHeadModel(untied).save_pretrained(tmp_path / "untied")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "untied")
    theirs.resize_token_embeddings(52)
    ours = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**untied.to_dict(), "vocab_size": 52}))
    assert ours.lm_head.weight.data_ptr() != ours.transformer.wte.weight.data_ptr()
    report = transfer(ours, tmp_path / "untied")
    assert report.ok and "new rows set to the old rows' mean" in report.adapted["lm_head.weight"], str(report)
    assert_same_state(ours, theirs, atol=1e-5)
    # A cut vocabulary keeps the first rows, as resize_token_embeddings does.
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    theirs.resize_token_embeddings(30)
    ours = transformers.GPT2LMHeadModel(config(30))
    transfer(ours, tmp_path)
    assert_same_state(ours, theirs)


# --------------------------------------------------------------------------------- timm
def test_timm_in_chans_and_num_classes_like_load_pretrained():
    timm = import_timm()
    from timm.models._builder import load_pretrained
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(3)
    src = ResNet(BasicBlock, [1, 1, 1, 1], in_chans=3, num_classes=10)
    sd = src.state_dict()
    for in_chans, classes in ((1, 5), (4, 10), (3, 7)):
        torch.manual_seed(4)
        theirs = ResNet(BasicBlock, [1, 1, 1, 1], in_chans=in_chans, num_classes=classes)
        torch.manual_seed(4)
        ours = ResNet(BasicBlock, [1, 1, 1, 1], in_chans=in_chans, num_classes=classes)
        cfg = {"state_dict": dict(sd), "first_conv": "conv1", "classifier": "fc", "num_classes": 10,
               "input_size": (3, 32, 32)}
        load_pretrained(theirs, pretrained_cfg=cfg, num_classes=classes, in_chans=in_chans, strict=False)
        report = transfer(ours, sd)
        assert_same_state(ours, theirs, atol=1e-6)
        if classes != 10:
            assert report.missing == ["fc.weight", "fc.bias"]  # a new head keeps its init, as in timm
        if in_chans != 3:
            assert report.adapted["conv1.weight"].startswith(f"in_channels 3->{in_chans}")
    assert timm.__version__


def test_timm_vit_at_another_image_size_like_checkpoint_filter_fn():
    import_timm()
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    def vit(img_size, reg_tokens=0):
        return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                 num_classes=4, reg_tokens=reg_tokens)

    for reg in (0, 2):
        torch.manual_seed(5)
        sd = vit(32, reg).state_dict()
        for size in (48, 16):
            theirs, ours = vit(size, reg), vit(size, reg)
            theirs.load_state_dict(checkpoint_filter_fn(dict(sd), theirs))
            report = transfer(ours, sd)
            assert report.ok, str(report)
            assert report.adapted["pos_embed"].startswith("pos_embed: grid 4x4 ->")
            assert_same_state(ours, theirs, atol=1e-6)


# --------------------------------------------------------------------------------- peft
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(8, 3)


def test_lora_adapter_onto_its_base_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(6)
    base = _Tiny()
    trained = peft.get_peft_model(base, peft.LoraConfig(**config))
    trained.save_pretrained(tmp_path)
    adapter = tmp_path / "adapter_model.safetensors"
    assert "base_model.model.layers.0.q_proj.lora_A.weight" in load_file(str(adapter))

    torch.manual_seed(7)
    fresh = _Tiny()
    theirs = peft.PeftModel.from_pretrained(_copy(fresh), tmp_path)
    torch.manual_seed(8)
    ours = peft.get_peft_model(_copy(fresh), peft.LoraConfig(**{**config, "init_lora_weights": True}))
    report = transfer(ours, adapter)
    lora = [k for k in ours.state_dict() if "lora_" in k]
    assert sorted(report.loaded) == sorted(lora) and not report.unused, str(report)
    assert_same_state(ours, theirs)


def _copy(m: nn.Module) -> nn.Module:
    new = _Tiny()
    new.load_state_dict(m.state_dict())
    return new


# ---------------------------------------------------------------------------- Lightning
def test_lightning_checkpoint_into_the_plain_module(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _Tiny()

        def training_step(self, batch, _):
            return self.model.head(self.model.layers[0].q_proj(batch[0])).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(9)
    lit = Lit()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(lit, data)
    path = tmp_path / "lit.ckpt"
    trainer.save_checkpoint(path)
    theirs = Lit.load_from_checkpoint(path).model
    ours = _Tiny()
    report = transfer(ours, path)
    assert report.ok and report.stripped == ["model."], str(report)
    assert_same_state(ours, theirs)
