"""Training-state folders as a whole: a transformers ``Trainer`` checkpoint (``checkpoint-N/``
with ``trainer_state.json``) or an accelerate ``save_state`` folder (``random_states_0.pkl``).

Every file is a part read by the reader its content calls for: the model weights (an index and
shards, or one weights file; accelerate's ``model_1.safetensors`` for a second model), the
optimizer, the scheduler, the RNG states, ``trainer_state.json`` (progress, log history) and
``training_args.bin`` (a pickled ``TrainingArguments``, kept as a placeholder: reading it as an
object needs transformers' code). A DeepSpeed ``global_stepN`` inside is read as DeepSpeed.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.limits import loads_json
from torchkeep.read.formats.composite import CompositeReader, module_tree

log = logging.getLogger(__name__)

_RNG = re.compile(r"^(rng_state(_\d+)?\.pth|random_states_\d+\.pkl)$")
_PART_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".safetensors", ".ckpt")
# File stem -> tree key (anything else keeps its stem).
_KEYS = {"optimizer": "optimizer", "scheduler": "scheduler", "scaler": "scaler",
         "training_args": "training_args", "sampler": "sampler"}


def _is_training_folder(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return "trainer_state.json" in names or any(re.match(r"^random_states_\d+\.pkl$", n) for n in names)


class TrainingFolderReader(CompositeReader):
    format = "training-folder"
    description = "transformers Trainer checkpoint or accelerate save_state folder"

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return os.path.isdir(path) and _is_training_folder(path)

    def read_tree(self) -> Any:
        from torchkeep.read.formats.deepspeed import DeepSpeedReader, step_folder
        from torchkeep.read.formats.hfindex import WEIGHT_NAMES, ShardedReader, find_index

        names = sorted(os.listdir(self.folder))
        self.kind = "trainer" if "trainer_state.json" in names else "accelerate"
        tree: dict[str, Any] = {}
        used: set[str] = set()
        if find_index(self.folder) is not None:
            r = ShardedReader(self.folder, trust=self.trust)
            self._parts[self.folder] = r
            tree["model"] = module_tree(r)
            used.update(os.path.basename(f) for f in r.files())
        else:
            first = next((n for n in WEIGHT_NAMES if n in names), None)
            if first is not None:
                tree["model"] = module_tree(self.part(os.path.join(self.folder, first)))
                used.add(first)
        rng: dict[str, Any] = {}
        for n in names:
            full = os.path.join(self.folder, n)
            if n in used or not os.path.isfile(full) or not n.endswith(_PART_SUFFIXES):
                continue
            try:
                sub = module_tree(self.part(full))
            except TorchkeepError as e:
                log.warning("%s: %s not read: %s", self.folder, n, e)
                tree.setdefault("unread", {})[n] = str(e)
                continue
            stem = n.rsplit(".", 1)[0]
            if _RNG.match(n):
                rng[stem] = sub
            else:
                tree[_KEYS.get(stem, stem)] = sub
        if rng:
            tree["rng"] = rng
        if "trainer_state.json" in names:
            path = os.path.join(self.folder, "trainer_state.json")
            with open(path, "rb") as f:
                tree["trainer_state"] = loads_json(f.read(), path=path, what="trainer_state.json")
        if step_folder(self.folder) is not None:
            ds = DeepSpeedReader(self.folder, trust=self.trust)
            self._parts[self.folder + "#deepspeed"] = ds
            tree["deepspeed"] = ds.read_tree()
        self.weights_at = "model" if "model" in tree else None
        self.metadata = {"parts": ",".join(k for k in tree if k != "unread")}
        return tree
