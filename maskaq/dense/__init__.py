"""Dense tasks (COCO Mask R-CNN, ADE20K UperNet) with an original-semantics Swin backbone.
See docs/dense.md."""
from .checkpoint import CheckpointError, load_dense_checkpoint, remap_state_dict
from .heads import ExplicitAdaptiveAvgPool2d
from .models import (DetConfig, MaskRCNN, SegConfig, UperNet, quantize_backbone, tiny_swin_config)
from .swin import SwinBackbone, SwinConfig

__all__ = ["SwinBackbone", "SwinConfig", "DetConfig", "SegConfig", "MaskRCNN", "UperNet", "quantize_backbone",
           "tiny_swin_config", "load_dense_checkpoint", "remap_state_dict", "CheckpointError",
           "ExplicitAdaptiveAvgPool2d"]
