"""The timm ViT families that --model takes (issue 29), in miniature: timm's own
VisionTransformer built with each family's options at the micro test size (patch 4, 32 px,
width 64, depth 4, 4 heads), with random weights, and the same model as this project's cuttable
ViT. No download: the architectures are timm's, the weights random.

`register(family)` adds the family to models.CONFIGS under 'test_<family>', so that the code
that resolves a family by name (check_arch, the cut, export) knows it."""
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as TimmViT

import models

SIZES = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
# the options of each family, as timm's model functions set them
FAMILIES = {
    'deit': {},                                                          # deit_*, vit_*_224 (AugReg)
    'deit3': dict(no_embed_class=True, init_values=1e-6),                # deit3_*
    'dinov2': dict(init_values=1e-5),                                    # vit_*_patch14_dinov2
    'dinov2_reg4': dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),  # vit_*_reg4_dinov2
    'clip': dict(pre_norm=True, norm_layer=nn.LayerNorm, act_layer='quick_gelu'),  # *_clip_quickgelu_*
    'gap': dict(class_token=False, global_pool='avg', fc_norm=False, qkv_bias=False,
                init_values=1e-6),                                       # vit_medium_patch16_gap_256
    'gap_fc_norm': dict(class_token=False, global_pool='avg'),           # avg pooling, fc_norm
    'qk_norm': dict(qk_norm=True),                                       # qk_norm
}


def timm_model(family: str, seed: int = 0, num_classes: int = 10) -> TimmViT:
    """timm's model of `family`, every parameter random (LayerScale too, so that it matters)."""
    torch.manual_seed(seed)
    model = TimmViT(**SIZES, num_classes=num_classes, **FAMILIES[family])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def register(family: str) -> str:
    """The name under which `family` is a registered family (models.CONFIGS) from now on."""
    name = f'test_{family}'
    if name not in models.CONFIGS:
        models.CONFIGS[name] = models.config_of(timm_model(family))
        models.vit_config.cache_clear()
    return name


def ours(family: str, seed: int = 0, num_classes: int = 10) -> models.VisionTransformer:
    """The cuttable ViT of `family` with timm_model(family, seed)'s weights."""
    return models.from_timm(timm_model(family, seed, num_classes), register(family)).eval()
