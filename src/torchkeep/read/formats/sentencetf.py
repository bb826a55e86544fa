"""sentence-transformers folders: ``modules.json`` lists the modules in order (the Transformer
at the folder itself, then ``1_Pooling``, ``2_Dense``, ...). Every module with weights is a
part; tensors are named as ``SentenceTransformer(folder).state_dict()`` names them: the
module's name, then the attribute under which the module keeps what it saved (``model.`` or
``auto_model.`` for the Transformer, depending on the sentence-transformers version that wrote
the folder, as its class path in modules.json tells)."""
from __future__ import annotations

import logging
import os
from typing import Any

from torchkeep.errors import FormatError
from torchkeep.limits import read_json_file
from torchkeep.read.formats.composite import CompositeReader, module_tree
from torchkeep.read.tree import join, walk

log = logging.getLogger(__name__)

# Module class (as modules.json spells it) -> attribute its saved weights load into.
INNER = {
    "sentence_transformers.models.Transformer": "auto_model",
    "sentence_transformers.models.Transformer.Transformer": "auto_model",
    "sentence_transformers.base.modules.transformer.Transformer": "model",
}
# Modules that save their own state dict under its own names.
DIRECT = ("Dense", "LayerNorm", "WordEmbeddings", "LSTM", "CNN", "WeightedLayerPooling",
          "StaticEmbedding", "Router", "SparseStaticEmbedding", "SpladePooling", "MLMTransformer")


def _modules(path: str) -> list[dict[str, Any]] | None:
    doc = read_json_file(os.path.join(path, "modules.json"), max_bytes=1 << 20, what="modules.json")
    if isinstance(doc, list) and doc and all(isinstance(m, dict) and "path" in m for m in doc):
        return doc
    return None


class SentenceTransformersReader(CompositeReader):
    format = "sentence-transformers"
    description = "sentence-transformers folder (modules.json + module folders)"
    kind = "sentence-transformers"

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return os.path.isdir(path) and _modules(path) is not None

    def read_tree(self) -> Any:
        from torchkeep.read.formats.hfindex import ShardedReader, find_index, find_weights

        mods = _modules(self.folder)
        if mods is None:
            raise FormatError("modules.json is missing or unreadable", path=self.folder)
        tree: dict[str, Any] = {}
        for m in mods:
            sub = os.path.normpath(os.path.join(self.folder, m["path"] or ""))
            if not sub.startswith(os.path.normpath(self.folder)):
                raise FormatError(f"modules.json names {m['path']!r}, outside the folder", path=self.folder)
            if find_index(sub) is None and not find_weights(sub):
                continue
            name = str(m.get("name", m.get("idx")))
            kind = str(m.get("type", ""))
            inner = INNER.get(kind)
            if inner is None and not kind.endswith(DIRECT):
                log.warning("%s: module %s (%s) is not on torchkeep's list; its tensors are named "
                            "as its file names them", self.folder, name, kind)
            r = self._parts.get(sub)
            if r is None:
                r = ShardedReader(sub, trust=self.trust)  # the module's own weights file
                self._parts[sub] = r
            part = {n: v for n, v in walk(module_tree(r))}
            tree[name] = {join(inner or "", n): v for n, v in part.items()}
        self.weights_at = tuple(tree)
        self.metadata = {"modules": ",".join(f"{m.get('name')}:{str(m.get('type', '')).rpartition('.')[2]}"
                                             for m in mods)}
        return tree
