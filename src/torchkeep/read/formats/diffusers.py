"""diffusers pipeline folders: ``model_index.json`` names the components; each component folder
with weights (``unet/``, ``vae/``, ``text_encoder/`` ...) is one part, read by the Hugging Face
folder reader. The tree has one entry per component; the model weights are all of them, named
``component.tensor`` (the scheduler and tokenizer folders hold configuration only)."""
from __future__ import annotations

import logging
import os
from typing import Any

from torchkeep.errors import FormatError
from torchkeep.limits import read_json_file
from torchkeep.read.formats.composite import CompositeReader, module_tree

log = logging.getLogger(__name__)


def _index(path: str) -> dict[str, Any] | None:
    doc = read_json_file(os.path.join(path, "model_index.json"), max_bytes=1 << 20,
                         what="model_index.json")
    return doc if isinstance(doc, dict) and "_class_name" in doc else None


class PipelineReader(CompositeReader):
    format = "diffusers"
    description = "diffusers pipeline folder (model_index.json + component folders)"
    kind = "pipeline"

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return os.path.isdir(path) and _index(path) is not None

    def read_tree(self) -> Any:
        from torchkeep.read.formats.hfindex import find_index, find_weights

        doc = _index(self.folder)
        if doc is None:
            raise FormatError("model_index.json is missing or unreadable", path=self.folder)
        tree: dict[str, Any] = {}
        config_only = []
        for name, spec in doc.items():
            sub = os.path.join(self.folder, name)
            if name.startswith("_") or not isinstance(spec, list) or not os.path.isdir(sub):
                continue
            if find_index(sub) is None and not find_weights(sub):
                config_only.append(name)
                continue
            tree[name] = module_tree(self.part(sub))
        self.weights_at = tuple(tree)
        self.metadata = {"pipeline": doc.get("_class_name"), "components": ",".join(tree),
                         "config only": ",".join(config_only)}
        tree["model_index"] = {k: v for k, v in doc.items() if not isinstance(v, list)}
        return tree
