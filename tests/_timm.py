"""Import timm for the tests that compare against it, in spite of torchvision.

timm imports torchvision (``torchvision.ops.misc.FrozenBatchNorm2d``). The only torchvision wheel
for this torch is a CUDA build: its C extension does not load beside CPU torch, and its import then
fails while registering fake kernels for ``torchvision::nms`` and friends, which do not exist. So
torchvision stays out of the environment: ``make install`` puts it, without dependencies, into
``.venv/torchvision-nodeps`` (or ``TORCHKEEP_TORCHVISION_PATH`` names another folder), and
:func:`import_timm` declares those operators' schemas with ``torch.library`` before importing it
(no kernels: nothing here calls them). Tests skip with this reason where that folder is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
)
_LIB = None


def _torchvision_folder() -> str | None:
    for folder in (os.environ.get("TORCHKEEP_TORCHVISION_PATH"),
                   os.path.join(sys.prefix, "torchvision-nodeps")):
        if folder and os.path.isdir(os.path.join(folder, "torchvision")):
            return folder
    return None


def import_timm():
    """timm, or a pytest skip that says why it cannot be imported here."""
    global _LIB
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    if "torchvision" not in sys.modules:
        try:
            importlib.import_module("torchvision")
        except Exception:  # noqa: BLE001 - absent, or the CUDA build failing beside CPU torch
            sys.modules.pop("torchvision", None)
            folder = _torchvision_folder()
            if folder is None:
                pytest.skip("timm imports torchvision, whose only wheel is a CUDA build that fails to "
                            "import beside CPU torch; `make install` puts it (--no-deps) into "
                            ".venv/torchvision-nodeps for these tests, and it is not there")
            if _LIB is None:
                _LIB = torch.library.Library("torchvision", "DEF")
                for schema in _SCHEMAS:
                    _LIB.define(schema)
            sys.path.insert(0, folder)
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            importlib.import_module("torchvision")
    return importlib.import_module("timm")
