"""``imagereward``: ImageReward-v1.0 (Xu et al., 2023): BLIP's ViT-L image encoder, BLIP's BERT text encoder
cross-attending to the image tokens, and an MLP on the [CLS] output, published as ``ImageReward.pt`` (keys
``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) with ``med_config.json``.

Score, as ImageReward's own ``score``: ``(mlp(text_encoder(prompt, image)[CLS]) - 0.16717362830052426) /
1.0333394966054072``; prompts through the BERT uncased tokenizer (+ BLIP's ``[DEC]``, ``[ENC]`` tokens),
padded to 35 tokens; images resized (shortest side, bicubic) and centre-cropped to 224 px, CLIP mean/std.

The modules are standard ones with BLIP's own key names: timm's ``VisionTransformer`` (BLIP's vit.py is
timm's ViT) and transformers' ``BlipTextModel`` (the port of BLIP's med.py BERT).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sr_ray.eval.scorers.aesthetic import MLPHead
from sr_ray.eval.scorers.base import (
    autocast,
    device_of,
    fetch_weights,
    in_batches,
    load_state,
    random_weights_warning,
    rgb,
    seeded,
)

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# med_config.json of ImageReward-v1.0 (BERT-base with cross-attention); encoder_width is the ViT-L's width
MED_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "vocab_size": 30524, "max_position_embeddings": 512, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "encoder_width": 1024}
TINY_MED = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 64, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
            "encoder_width": 48}
TINY_VIT = {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2}


@dataclass
class ImageRewardConfig:
    weights: str | None = None
    """``ImageReward.pt`` (local, s3://, URL, or hub file THUDM/ImageReward/ImageReward.pt); none: random weights
    of a small variant with a character-level vocabulary (demo only)."""
    med_config: str | None = None
    """Its ``med_config.json`` (a file, or a hub file); none: ImageReward-v1.0's values."""
    tokenizer: str = "bert-base-uncased"
    """A BERT uncased tokenizer folder or hub id (any folder with the 30522-token ``vocab.txt`` works)."""
    vit_width: int = 1024
    """BLIP image encoder (ImageReward-v1.0: ViT-L/16 at 224 px); other sizes for other BLIP checkpoints."""
    vit_depth: int = 24
    vit_heads: int = 16
    patch_size: int = 16
    image_size: int = 224
    random_size: str = "small"
    """Without ``weights``: small (demo, tests) or full (ImageReward-v1.0's shape, random: benchmarks)."""

    def __post_init__(self) -> None:
        if self.random_size not in ("small", "full"):
            raise ValueError(f"imagereward.random_size={self.random_size!r}: small or full")

    def vit(self) -> dict:
        return {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vit_width,
                "depth": self.vit_depth, "heads": self.vit_heads}


def tiny_tokenizer_dir(folder: str | Path) -> Path:
    """A WordPiece vocabulary of single characters (+ ``##`` continuations): every prompt tokenises, no download."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)][:62]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder


def blip_tokenizer(source: str):
    """BERT uncased + BLIP's special tokens, as BLIP's ``init_tokenizer`` (vocabulary 30522 -> 30524)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(source)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def vision_encoder(v: dict) -> nn.Module:
    """BLIP's ViT (timm layout: cls token, qkv bias, LayerNorm eps 1e-6); forward_features -> (B, 1+P, width)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=v["image_size"], patch_size=v["patch_size"], embed_dim=v["width"],
                             depth=v["depth"], num_heads=v["heads"], mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                             global_pool="", norm_layer=partial(nn.LayerNorm, eps=1e-6))


def text_encoder(med: dict) -> nn.Module:
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    cfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                         encoder_hidden_size=med["encoder_width"], intermediate_size=med["intermediate_size"],
                         num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                         max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
                         hidden_act=med["hidden_act"], bos_token_id=None, sep_token_id=None, pad_token_id=0,
                         is_decoder=True)  # builds the cross-attention; forward(is_decoder=False) keeps BERT's
    # bidirectional mask, as BLIP's med.py in 'multimodal' mode
    return BlipTextModel(cfg, add_pooling_layer=False)


class ImageRewardModel(nn.Module):
    """Module tree with ImageReward.pt's key names: ``blip.visual_encoder``, ``blip.text_encoder``, ``mlp``."""

    def __init__(self, vit: dict, med: dict):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = vision_encoder(vit)
        self.blip.text_encoder = text_encoder(med)
        self.mlp = MLPHead(med["hidden_size"])

    def forward(self, input_ids, attention_mask, pixels) -> torch.Tensor:
        img = self.blip.visual_encoder.forward_features(pixels)
        att = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        out = self.blip.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                                     encoder_attention_mask=att, is_decoder=False)
        return (self.mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1) - MEAN) / STD


def _med_config(path: str | None, encoder_width: int) -> dict:
    if path is None:
        return {**MED_CONFIG, "encoder_width": encoder_width}
    local = fetch_weights(path, "imagereward.med_config")
    try:
        raw = json.loads(Path(local).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"imagereward.med_config={path}: not a JSON file ({e})") from None
    med = {**MED_CONFIG, **{k: raw[k] for k in MED_CONFIG if k in raw}}
    med["vocab_size"] = max(med["vocab_size"], 30524)  # BLIP adds [DEC] and [ENC] to BERT's 30522
    med["encoder_width"] = encoder_width  # BLIP sets it from the image encoder, whatever the file says
    return med


def unused(key: str) -> bool:
    """Keys of ImageReward.pt its score never uses: BLIP's contrastive projections, a buffer of positions."""
    return key.startswith(("blip.vision_proj.", "blip.text_proj.")) or key.endswith("embeddings.position_ids")


def transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(CLIP_MEAN, CLIP_STD)])


class ImageReward:
    name = "imagereward"

    def __init__(self, cfg: ImageRewardConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
        self.device, self.bf16, self.batch_size = device_of(device), bf16, batch_size
        if cfg.weights is None:
            random_weights_warning(self.name)
            vit, med = (cfg.vit(), {**MED_CONFIG, "encoder_width": cfg.vit_width}) \
                if cfg.random_size == "full" else (TINY_VIT, TINY_MED)
            self.tokenizer = blip_tokenizer(str(tiny_tokenizer_dir(tempfile.mkdtemp(prefix="sr-ray-ir-"))))
        else:
            vit = cfg.vit()
            med = _med_config(cfg.med_config, vit["width"])
            self.tokenizer = blip_tokenizer(fetch_weights(cfg.tokenizer, "imagereward.tokenizer"))
        with seeded(0):
            self.model = ImageRewardModel(vit, med)
        if cfg.weights is not None:
            state = load_state(fetch_weights(cfg.weights, "imagereward.weights"), "imagereward.weights")
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            unexpected = [k for k in unexpected if not unused(k)]
            if missing or unexpected:
                raise ValueError(f"imagereward.weights={cfg.weights}: not ImageReward-v1.0's layout (missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]})")
        self.model.eval().to(self.device)
        self.transform = transform(vit["image_size"])

    @torch.no_grad()
    def _batch(self, prompts: list[str], images: list) -> torch.Tensor:
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        pix = torch.stack([self.transform(x) for x in rgb(images)]).to(self.device)
        with autocast(self.device, self.bf16):
            return self.model(text.input_ids, text.attention_mask, pix).float().cpu()

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        return in_batches(self._batch, prompts, images, self.batch_size)


def build(cfg: ImageRewardConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
    return ImageReward(cfg, device, batch_size, bf16)
