"""What defines a ViT family: its sizes and the timm VisionTransformer options this project's
cuttable ViT supports, declared once (`ViTConfig`). DeiT's values are the defaults."""
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional

GLOBAL_POOLS = ('token', 'avg')
ACTS = ('gelu', 'quick_gelu')


@dataclass(frozen=True)
class ViTConfig:
    """A family: sizes, then options with timm's names and meanings (timm.models.
    vision_transformer.VisionTransformer):

    class_token     a class token first in the sequence (False: none, pool by average)
    reg_tokens      register tokens after the class token (DINOv2 reg4)
    no_embed_class  the position embedding covers the patch tokens only (DeiT III, DINOv2)
    global_pool     'token' (the class token's features) or 'avg' (the patch tokens' mean)
    fc_norm         the final LayerNorm after pooling (`fc_norm`) instead of before (`norm`)
    final_norm      a final LayerNorm at all
    pre_norm        a LayerNorm before the blocks, `norm_pre`; the patch embedding has no bias (CLIP)
    init_values     LayerScale's initial γ (DeiT III, DINOv2); None: no LayerScale
    qk_norm         a LayerNorm over each head's q and k
    act             the MLP's activation: 'gelu' or CLIP's 'quick_gelu'
    norm_eps        every LayerNorm's eps (timm's ViTs 1e-6, CLIP 1e-5)
    distilled       DeiT's distilled family: a distillation token and a second head
    """
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int
    distilled: bool = False
    mlp_ratio: float = 4.
    qkv_bias: bool = True
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = 'token'
    fc_norm: bool = False
    final_norm: bool = True
    pre_norm: bool = False
    init_values: Optional[float] = None
    qk_norm: bool = False
    act: str = 'gelu'
    norm_eps: float = 1e-6

    SIZES = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'img_size')

    def __post_init__(self):
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f'global_pool must be one of {", ".join(GLOBAL_POOLS)}, got {self.global_pool!r}')
        if self.act not in ACTS:
            raise ValueError(f'act must be one of {", ".join(ACTS)}, got {self.act!r}')
        if self.global_pool == 'token' and not self.class_token:
            raise ValueError("global_pool 'token' needs the class token")
        if self.distilled and (not self.class_token or self.reg_tokens or self.no_embed_class):
            raise ValueError('the distilled family is DeiT\'s: a class token, no registers, '
                             'a position embedding on every token')

    def options(self) -> Dict:
        """The constructor arguments beyond the sizes (VisionTransformer's keywords)."""
        return {k: v for k, v in asdict(self).items() if k not in self.SIZES}

    @classmethod
    def option_defaults(cls) -> Dict:
        """DeiT's value of every option: what an `arch` written before the option existed means."""
        return {f.name: f.default for f in fields(cls) if f.name not in cls.SIZES}

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    def describe(self) -> str:
        """One line: the sizes and every option that is not DeiT's."""
        changed = [f'{k}={v}' for k, v in self.options().items() if v != self.option_defaults()[k]]
        return (f'patch {self.patch_size}, {self.img_size} px, width {self.embed_dim}, depth {self.depth}, '
                f'{self.num_heads} heads' + (f'; {", ".join(changed)}' if changed else ''))
