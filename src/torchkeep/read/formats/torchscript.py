"""TorchScript archives (``torch.jit.save``) seen as data: the module's tensors by attribute path.

``data.pkl`` of a TorchScript archive pickles each scripted module as an instance of a
``__torch__.*`` class whose state is its attribute dict (``training``, parameters, buffers,
submodules). The restricted unpickler leaves those classes as placeholders, and this module
walks their attribute dicts to name the tensors the way ``torch.jit.load(f).state_dict()`` does;
``constants.pkl`` holds the tensor constants of the code. Nothing of the code is run.
"""
from __future__ import annotations

import logging
from typing import Any

from torchkeep.read.formats.base import TensorRef
from torchkeep.read.tree import join, walk

log = logging.getLogger(__name__)


def _is_script_object(obj: Any) -> bool:
    from torchkeep.read.unpickler import Opaque

    return isinstance(obj, Opaque) and obj.global_name.startswith("__torch__.")


def _attributes(obj: Any, prefix: str, out: dict[str, Any], where: str, seen: set[int]) -> None:
    if id(obj) in seen:  # a submodule shared under two names keeps both names, like state_dict
        seen = set()
    seen = seen | {id(obj)}
    state = obj.state
    if not isinstance(state, dict):
        # A class with its own __getstate__: its state is whatever the code made of it.
        log.warning("%s: %s (%s) keeps a custom state; its tensors are listed by position",
                    where, prefix or "<root>", obj.global_name)
        for name, v in walk(state, prefix):
            if isinstance(v, TensorRef):
                out[name] = v
        return
    for k, v in state.items():
        name = join(prefix, k)
        if isinstance(v, TensorRef):
            out[name] = v
        elif _is_script_object(v) and id(v) not in seen:
            _attributes(v, name, out, where, seen)


def script_tree(root: Any, constants: Any, where: str) -> dict[str, Any]:
    """``{"module": name -> tensor, "constants": index -> tensor}`` of a TorchScript archive."""
    module: dict[str, Any] = {}
    if _is_script_object(root):
        _attributes(root, "", module, where, set())
    else:
        for name, v in walk(root):
            if isinstance(v, TensorRef):
                module[name] = v
    consts = {str(i): c for i, c in enumerate(constants if isinstance(constants, tuple) else ())
              if isinstance(c, TensorRef)}
    return {"module": module, "constants": consts}
