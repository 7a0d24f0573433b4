"""Frozen-trunk features: a CLIP tower split at its first trainable block.

With the last k of a tower's N blocks trainable and deterministic preprocessing
(the paper uses no augmentation), what enters block N-k is the same every epoch:
the *trunk* (embeddings and blocks 0..N-k-1) can run once and its output be kept;
the *head* (blocks N-k..N-1, final norm, pooling, projection) is all a training
step has to run. ``head(trunk(x)) == tower(x)``: the model computes the same
function (``tests/test_feature_cache.py`` checks the scores are equal).

Supported: open_clip's own towers (``VisionTransformer``; the CLIP text tower),
the layouts of every ViT model the paper and sr-ray use. Another layout gets a
clear error naming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sr_ray.reward.model import RewardModel


def _vision(clip: nn.Module) -> nn.Module:
    visual = getattr(clip, "visual", None)
    if visual is None or not all(hasattr(visual, a) for a in ("_embeds", "_pool", "transformer", "proj")):
        raise NotImplementedError(
            f"a feature cache needs open_clip's VisionTransformer image tower; this model's is "
            f"{type(visual).__name__} (use data.feature_cache=null)")
    return visual


def _blocks(tower_transformer: nn.Module, depth: int, what: str) -> list[nn.Module]:
    blocks = list(tower_transformer.resblocks)
    if not 0 <= depth <= len(blocks):
        raise ValueError(f"{what} depth {depth} outside [0, {len(blocks)}] (the tower has {len(blocks)} blocks)")
    return blocks


def _run(transformer: nn.Module, x: torch.Tensor, blocks: list[nn.Module], attn_mask=None) -> torch.Tensor:
    """Blocks of an open_clip ``Transformer`` on batch-first ``x``, as its forward runs them."""
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for r in blocks:
        x = r(x, attn_mask=attn_mask)
    return x if transformer.batch_first else x.transpose(0, 1)


def vision_blocks(clip: nn.Module) -> int:
    return len(list(_vision(clip).transformer.resblocks))


def text_blocks(clip: nn.Module) -> int:
    return len(list(clip.transformer.resblocks))


def image_trunk(clip: nn.Module, pixels: torch.Tensor, depth: int) -> torch.Tensor:
    """The tokens entering vision block ``depth``: (B, tokens, width)."""
    visual = _vision(clip)
    blocks = _blocks(visual.transformer, depth, "vision")
    return _run(visual.transformer, visual._embeds(pixels), blocks[:depth])


def image_head(clip: nn.Module, tokens: torch.Tensor, depth: int) -> torch.Tensor:
    """Image embedding (not normalised) from the tokens entering vision block ``depth``."""
    visual = _vision(clip)
    blocks = _blocks(visual.transformer, depth, "vision")
    x = _run(visual.transformer, tokens, blocks[depth:])
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def _text_tower(clip: nn.Module) -> nn.Module:
    if not all(hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        raise NotImplementedError(f"a text feature cache needs open_clip's CLIP text tower, not "
                                  f"{type(clip).__name__}'s (keep unfreeze_text_blocks=-1 or use no cache)")
    return clip


def text_trunk(clip: nn.Module, ids: torch.Tensor, depth: int) -> torch.Tensor:
    """The token states entering text block ``depth``: (B, context, width)."""
    c = _text_tower(clip)
    blocks = _blocks(c.transformer, depth, "text")
    x = c.token_embedding(ids).to(c.transformer.get_cast_dtype()) + c.positional_embedding.to(
        c.transformer.get_cast_dtype())
    return _run(c.transformer, x, blocks[:depth], c.attn_mask)


def text_head(clip: nn.Module, states: torch.Tensor, ids: torch.Tensor, depth: int) -> torch.Tensor:
    """Text embedding (not normalised) from the states entering text block ``depth`` and the token ids."""
    from open_clip.transformer import text_global_pool

    c = _text_tower(clip)
    blocks = _blocks(c.transformer, depth, "text")
    x = c.ln_final(_run(c.transformer, states, blocks[depth:], c.attn_mask))
    x = text_global_pool(x, ids, c.text_pool_type, eos_token_id=getattr(c, "text_eos_id", None))
    proj = c.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _states(x: torch.Tensor) -> torch.Tensor:
    """Cached states as stored (int16 bf16 bits) or already floating -> float32."""
    return x.view(torch.bfloat16).float() if x.dtype == torch.int16 else x.float()


class HeadRewardModel(RewardModel):
    """:class:`RewardModel` that reads the trunk's output: ``encode_image`` takes the tokens entering vision block
    ``image_depth`` (B, T, W); ``encode_text`` takes token ids, or (ids, states entering text block
    ``text_depth``) when the text trunk is cached too. Pixels and plain ids still work (the model is whole)."""

    def __init__(self, clip: nn.Module, image_depth: int, text_depth: int | None):
        super().__init__(clip)
        self.image_depth, self.text_depth = image_depth, text_depth

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return normalize(image_head(self.clip, _states(x), self.image_depth))
        return super().encode_image(x)

    def encode_text(self, tokens) -> torch.Tensor:
        if isinstance(tokens, (tuple, list)):
            ids, states = tokens
            return normalize(text_head(self.clip, _states(states), ids, self.text_depth))
        return super().encode_text(tokens)
