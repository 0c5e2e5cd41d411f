"""Models by name: DeiT's and the test models registered with timm by name
(`timm.create_model('deit_small_patch16_224', ...)`), and any timm VisionTransformer whose
options `ViTConfig` covers, built as this project's cuttable ViT (`create_model`, families.py)."""
import warnings

from timm.models import register_model

from .vision_transformer import (ALL_GATE_NAMES, ATTN_GATES, GATE_NAMES, GATE_SLOTS, HEAD_GATE,
                                 MLP_GATES, Gate, VisionTransformer, binarize, build_from_arch,
                                 dense_block_arch, is_gate, masked_layer_norm, pool_tokens)
from .config import ViTConfig
from .checkpoint import check_arch, load_model, pretrained_state_dict, state_dict_mismatch
from .deploy import align_widths, apply_forms, deploy, median_seconds, plan_forms
from .hub import (read_safetensors, read_safetensors_checkpoint, read_timm_folder, write_safetensors_checkpoint,
                  write_timm_folder)

# The official DeiT ImageNet checkpoints (facebookresearch/deit), for --model-path.
DEIT_URLS = {
    'deit_tiny_patch16_224': 'https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth',
    'deit_small_patch16_224': 'https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth',
    'deit_base_patch16_224': 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth',
    'deit_tiny_distilled_patch16_224':
        'https://dl.fbaipublicfiles.com/deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth',
    'deit_small_distilled_patch16_224':
        'https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth',
    'deit_base_distilled_patch16_224':
        'https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth',
}

CONFIGS = {
    'deit_tiny_patch16_224': ViTConfig(16, 192, 12, 3, 224),
    'deit_small_patch16_224': ViTConfig(16, 384, 12, 6, 224),
    'deit_base_patch16_224': ViTConfig(16, 768, 12, 12, 224),
    'deit_tiny_distilled_patch16_224': ViTConfig(16, 192, 12, 3, 224, distilled=True),
    'deit_small_distilled_patch16_224': ViTConfig(16, 384, 12, 6, 224, distilled=True),
    'deit_base_distilled_patch16_224': ViTConfig(16, 768, 12, 12, 224, distilled=True),
    'vit_tiny_patch16_224': ViTConfig(16, 192, 12, 3, 224),
    'vit_small_patch16_224': ViTConfig(16, 384, 12, 6, 224),
    'vit_base_patch16_224': ViTConfig(16, 768, 12, 12, 224),
    # Sized for CPU tests and the DIGITS demo: 32x32 input, 8x8 patches grid, 4 layers.
    'deit_micro_patch4_32': ViTConfig(4, 64, 4, 4, 32),
    'deit_micro_distilled_patch4_32': ViTConfig(4, 64, 4, 4, 32, distilled=True),
    # The same width with DeiT's 12 layers: the transfer comparison and the ΔΨ estimator check.
    'deit_micro12_patch4_32': ViTConfig(4, 64, 12, 4, 32),
    # DINOv2 with registers in miniature (vit_small_patch14_reg4_dinov2's options): LayerScale,
    # 4 register tokens, no position embedding on the prefix tokens.
    'vit_micro_patch4_reg4_dinov2': ViTConfig(4, 64, 4, 4, 32, reg_tokens=4, no_embed_class=True,
                                              init_values=1e-5),
}


def _entrypoint(name):
    cfg = CONFIGS[name]

    def create(pretrained=False, **kwargs):
        if pretrained:
            raise ValueError('pretrained=True is not supported: pass a checkpoint with --model-path')
        return create_model(name, **kwargs)

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f'{name}: {cfg.describe()}.'
    return create


# Our deit_* / vit_* replace timm's entries of the same name (as DeiT's own models.py does):
# timm warns about that on purpose, we mean it.
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for _name in CONFIGS:
        globals()[_name] = register_model(_entrypoint(_name))

from .families import config_of, create_model, from_timm, is_supported, supported_models, vit_config  # noqa: E402
