"""transfer() on 24-layer transformers: plan + apply vs torch's own load_state_dict, same run.

    python benchmarks/bench_transfer.py --size-mb 256 --repeat 5

Target (issue 3): plan + apply for a 24-layer transformer (~2,000 tensors) within 0.5 s beyond
reading and copying the bytes. "Beyond the bytes" is measured as ours minus the baseline that
copies the same bytes (``load_state_dict`` of an already renamed state dict; for a safetensors
file, ``load_file`` + rename + ``load_state_dict(strict=False)``, the loop users write by hand). Three pairings are timed: exact names,
a ``bert.`` prefix (encoder -> classifier), and every module renamed (structure only). The
24-layer BERT has 391 tensors, so a 128-layer one (2,055 tensors) covers the ~2,000 count.
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop, median_time, parser, report, tmpdir  # noqa: E402

import torchkeep  # noqa: E402
from torchkeep.demo.models import TinyBert, TinyBertClassifier


def renamed(name: str) -> str:
    """A consistent renaming that leaves no name (and no prefix) in common."""
    parts = name.split(".")
    table = {"embeddings": "emb", "encoder": "trunk", "layer": "blocks", "attention": "attn",
             "self": "inner", "query": "q", "key": "k", "value": "v", "output": "out",
             "dense": "proj", "LayerNorm": "norm", "intermediate": "mlp", "pooler": "pool",
             "word_embeddings": "tok", "position_embeddings": "pos", "token_type_embeddings": "seg"}
    return "_".join(table.get(p, p) for p in parts[:-1]) + "." + parts[-1]


def bench(layers: int, hidden: int, repeat: int, d: str) -> list:
    heads = max(1, hidden // 64)
    torch.manual_seed(0)
    src = TinyBert(vocab_size=1000, hidden=hidden, layers=layers, heads=heads, intermediate=4 * hidden,
                   max_position=128)
    sd = src.state_dict()
    label = f"{layers} layers, {len(sd)} tensors, {sum(v.numel() for v in sd.values()) * 4 / 2**20:.0f} MiB"
    kw = dict(vocab_size=1000, hidden=hidden, layers=layers, heads=heads, intermediate=4 * hidden,
              max_position=128)
    same = TinyBert(**kw)
    cls = TinyBertClassifier(num_labels=3, **kw)
    other = {renamed(k): v.clone() for k, v in sd.items()}
    assert torchkeep.transfer(same, sd).ok
    assert torchkeep.transfer(other, sd, dry_run=True).ok

    cls_sd = {"bert." + k: v for k, v in sd.items()}
    other_sd = {renamed(k): v for k, v in sd.items()}
    rows = []
    t_base = median_time(lambda: same.load_state_dict(sd), repeat)
    t_plan = median_time(lambda: torchkeep.transfer(same, sd, dry_run=True), repeat)
    t_ours = median_time(lambda: torchkeep.transfer(same, sd), repeat)
    rows.append((f"{label}: plan only (exact names)", t_plan, t_base, "(info)"))
    rows.append((f"{label}: plan+apply, exact names", t_ours, t_base, f"+{(t_ours - t_base):.3f}s <= 0.5s"))
    t_base = median_time(lambda: cls.load_state_dict(cls_sd, strict=False), repeat)
    t_ours = median_time(lambda: torchkeep.transfer(cls, sd), repeat)
    rows.append((f"{label}: plan+apply, 'bert.' prefix", t_ours, t_base, f"+{(t_ours - t_base):.3f}s <= 0.5s"))

    def copy_renamed() -> None:
        with torch.no_grad():
            for k, v in other_sd.items():
                other[k].copy_(v)

    t_base = median_time(copy_renamed, repeat)
    t_ours = median_time(lambda: torchkeep.transfer(other, sd), repeat)
    rows.append((f"{label}: plan+apply, all renamed (structure)", t_ours, t_base,
                 f"+{(t_ours - t_base):.3f}s <= 0.5s"))

    # From a safetensors file, against what users write by hand today: read the file, add the
    # prefix, load_state_dict(strict=False). Both read and copy the same bytes.
    from safetensors.torch import load_file, save_file
    path = os.path.join(d, f"bert{layers}.safetensors")
    save_file(sd, path)

    def by_hand() -> None:
        cls.load_state_dict({"bert." + k: v for k, v in load_file(path).items()}, strict=False)

    t_base = median_time(by_hand, repeat)
    t_ours = median_time(lambda: torchkeep.transfer(cls, path), repeat)
    rows.append((f"{label}: from safetensors into classifier", t_ours, t_base,
                 f"+{(t_ours - t_base):.3f}s <= 0.5s"))
    drop(path)
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size of the 24-layer model (default: from --size-mb)")
    args = p.parse_args()
    # 24 layers of 12 h^2 float32 weights ~= size-mb.
    hidden = args.hidden or max(64, round(math.sqrt(args.size_mb * 2**20 / (24 * 48)) / 64) * 64)
    d = tmpdir(args)
    rows = bench(24, hidden, args.repeat, d)
    rows += bench(128, 64, args.repeat, d)
    report(f"transfer: plan + apply (median of {args.repeat}); baseline copies the same bytes", rows)
    drop(d)


if __name__ == "__main__":
    main()
