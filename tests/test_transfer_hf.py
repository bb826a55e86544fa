"""Our report for BertModel <-> BertForSequenceClassification agrees with what transformers'
own ``from_pretrained(..., output_loading_info=True)`` reports for the same pair of files."""
from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchkeep import transfer


def tiny_config(**kw):
    return transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=32, **kw)


def test_bert_reports_match_transformers(tmp_path):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    base = transformers.BertModel(tiny_config())
    base.save_pretrained(tmp_path / "base")

    # BertModel -> BertForSequenceClassification: the head is missing, nothing unused.
    hf_model, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "base", output_loading_info=True)
    ours = transformers.BertForSequenceClassification(tiny_config())
    report = transfer(ours, tmp_path / "base")
    assert set(report.missing) == set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert set(report.unused) == set(info["unexpected_keys"]) == set()
    for name, value in ours.state_dict().items():
        if name in report.loaded:
            assert torch.equal(value, hf_model.state_dict()[name]), name
    assert report.methods() == {"prefix": len(report.loaded)}

    # And back: the head is unused, nothing missing.
    hf_model.save_pretrained(tmp_path / "cls")
    _, info = transformers.BertModel.from_pretrained(tmp_path / "cls", output_loading_info=True)
    report = transfer(transformers.BertModel(tiny_config()), tmp_path / "cls", dry_run=True)
    assert set(report.missing) == set(info["missing_keys"]) == set()
    assert set(report.unused) == set(info["unexpected_keys"]) == {"classifier.weight", "classifier.bias"}

    # A head with another number of labels: transformers calls it mismatched (with
    # ignore_mismatched_sizes); with adapters off, ours is missing on one side, unused on the other.
    _, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "cls", num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    mismatched = {k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]}
    report = transfer(transformers.BertForSequenceClassification(tiny_config(num_labels=5)),
                      tmp_path / "cls", adapt=False, dry_run=True)
    assert set(report.missing) == set(report.unused) == mismatched == {"classifier.weight", "classifier.bias"}
