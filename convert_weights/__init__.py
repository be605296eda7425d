"""Import PyTorch Swin ImageNet checkpoints and every released SeMask checkpoint (FPN,
Mask2Former, FaPN- / MSFaPN-Mask2Former, MaskFormer; see core.py)."""
from convert_weights.bicubic import resize_bias_table
from convert_weights.checkpoint import load_into_model, read_conversion_meta, save_conversion
from convert_weights.core import (Conversion, ConversionError, ConversionReport,
                                  HEAD_FAMILIES, convert_semask, convert_semask_checkpoint,
                                  convert_semask_mask2former, head_family,
                                  convert_semask_maskformer, infer_maskformer_config,
                                  convert_swin_imagenet, extract_state_dict,
                                  infer_mask2former_config, infer_model_config, load_state_dict, model_leaves, plan_state_dict,
                                  read_pth)

__all__ = ["Conversion", "ConversionError", "ConversionReport", "HEAD_FAMILIES",
           "convert_semask", "convert_semask_checkpoint", "head_family",
           "convert_semask_mask2former", "convert_semask_maskformer", "convert_swin_imagenet",
           "infer_maskformer_config", "extract_state_dict",
           "infer_mask2former_config", "infer_model_config",
           "load_into_model", "load_state_dict", "model_leaves", "plan_state_dict", "read_conversion_meta",
           "read_pth", "resize_bias_table", "save_conversion"]
