"""Reference scores from the peers' OWN code, for sr-ray's scorers to be checked against.

Runs in a second virtual environment holding the peers' packages (``hpsv2``, ``image-reward``, openai's
``clip`` for the LAION aesthetic predictor's own recipe, transformers 4.x for PickScore's README code); it
imports nothing of sr-ray. ``jobs/verify_scorers.py`` creates that environment and runs this script.

For every peer it builds a small variant of the peer's architecture with random seeded weights, saves them in
the peer's PUBLISHED format (``{"state_dict": ...}`` like HPS_v2_compressed.pt; a flat state dict + a
med_config.json like ImageReward.pt; OpenAI CLIP weights + a head .pth like the LAION predictor; a
transformers model folder + processor folder like PickScore_v1) and scores every (prompt, image) pair with
the peer's own scoring code. Out: ``<out>/reference.json`` with the scores and every file's path.

    python jobs/reference/peer_scores.py --out DIR --images DIR --prompts FILE --sr-configs sr_ray/reward/model_configs
"""

import argparse
import contextlib
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def hps(out, imgs, prompts, sr_configs):
    """hpsv2's img_score.score, fed a small model built by hpsv2's own open_clip (its model_dict cache skips
    the download) and a checkpoint in the HPS_v2_compressed.pt layout."""
    from hpsv2 import img_score
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms

    add_model_config(os.path.join(sr_configs, "sr-tiny-77.json"))
    torch.manual_seed(0)
    model, _, preprocess_val = create_model_and_transforms(
        "sr-tiny-77", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # HPS ignores it: so must sr-ray
    ckpt = os.path.join(out, "HPS_tiny_compressed.pt")
    torch.save({"state_dict": model.state_dict()}, ckpt)
    img_score.model_dict["model"], img_score.model_dict["preprocess_val"] = model, preprocess_val
    scores = [float(img_score.score([im], p, cp=ckpt)[0]) for p, im in zip(prompts, imgs)]
    return {"weights": ckpt, "model": "sr-tiny-77", "scores": scores}


@contextlib.contextmanager
def small_blip(width, depth, heads, hidden):
    """ImageReward hard-codes ViT-L and MLP(768): swap in BLIP's own ViT class at a small size."""
    import ImageReward.ImageReward  # noqa: F401
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    irmod = sys.modules["ImageReward.ImageReward"]  # the package shadows the module with the class
    vit0, mlp0 = blip_pretrain.create_vit, irmod.MLP

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=width, depth=depth, num_heads=heads,
                                 use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                 drop_path_rate=0.1), width

    blip_pretrain.create_vit, irmod.MLP = create_vit, (lambda input_size: mlp0(hidden))
    try:
        yield irmod
    finally:
        blip_pretrain.create_vit, irmod.MLP = vit0, mlp0


def imagereward(out, imgs, prompts, bert_vocab):
    """ImageReward.load(local .pt, med_config=local json) and its model.score(prompt, image)."""
    import ImageReward as RM

    tok = os.path.join(out, "bert-base-uncased")  # a folder of this name in the cwd wins over the hub
    os.makedirs(tok, exist_ok=True)
    shutil.copyfile(bert_vocab, os.path.join(tok, "vocab.txt"))
    with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512}, f)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
           "encoder_width": 768, "add_cross_attention": True}
    med_path = os.path.join(out, "med_config.json")
    with open(med_path, "w") as f:
        json.dump(med, f)
    cwd = os.getcwd()
    os.chdir(out)
    try:
        with small_blip(64, 2, 2, 64) as irmod:
            torch.manual_seed(0)
            m0 = irmod.ImageReward(med_config=med_path, device="cpu")
            with torch.no_grad():  # spread the random rewards (ImageReward's own MLP init makes them ~constant)
                for layer in m0.mlp.layers:
                    if isinstance(layer, torch.nn.Linear):
                        layer.reset_parameters()
                for p in m0.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            ckpt = os.path.join(out, "ImageReward_small.pt")
            torch.save(m0.state_dict(), ckpt)
            model = RM.load(ckpt, device="cpu", med_config=med_path)
        with torch.no_grad():
            scores = [float(model.score(p, im)) for p, im in zip(prompts, imgs)]
    finally:
        os.chdir(cwd)
    return {"weights": ckpt, "med_config": med_path, "tokenizer": tok, "vit_width": 64, "vit_depth": 2,
            "vit_heads": 2, "patch_size": 16, "image_size": 224, "scores": scores}


def aesthetic(out, imgs):
    """The LAION predictors' own recipe: openai clip's encode_image on its preprocess, L2-normalised, then the
    head (nn.Linear for sa_0_4_*_linear.pth; the improved predictor's MLP, keys layers.0..7)."""
    import clip
    from torch import nn

    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2,
                            transformer_layers=2).eval()
    clip_path = os.path.join(out, "openai_clip_tiny.pt")
    torch.save(model.state_dict(), clip_path)
    preprocess = clip.clip._transform(32)
    with torch.no_grad():
        emb = torch.cat([model.encode_image(preprocess(im).unsqueeze(0)) for im in imgs]).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
    linear = nn.Linear(32, 1)
    mlp = nn.Module()
    mlp.layers = nn.Sequential(nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                               nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    mlp.eval()
    res = {"clip_model": "sr-tiny-quickgelu", "clip_pretrained": clip_path}
    for name, head in (("linear", linear), ("mlp", mlp)):
        path = os.path.join(out, f"aesthetic_{name}.pth")
        torch.save(head.state_dict(), path)
        with torch.no_grad():
            y = head(emb) if name == "linear" else head.layers(emb)
        res[name] = {"weights": path, "scores": y[:, 0].tolist()}
    return res


def clip_vocab(folder):
    import gzip

    import open_clip
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")


def pickscore(out, imgs, prompts):
    """PickScore's README inference code, with AutoProcessor / AutoModel from local folders."""
    from transformers import (
        AutoModel,
        AutoProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    v, m = clip_vocab(os.path.join(out, "bpe"))
    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc_dir = os.path.join(out, "pickscore_processor")
    CLIPProcessor(image_processor=ip, tokenizer=CLIPTokenizer(v, m, pad_token="<|endoftext|>",
                                                              model_max_length=77)).save_pretrained(proc_dir)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      max_position_embeddings=77, hidden_act="gelu"),
                     vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=224, patch_size=32, hidden_act="gelu"),
                     projection_dim=32, logit_scale_init_value=4.6052)
    model_dir = os.path.join(out, "PickScore_tiny")
    CLIPModel(cfg).save_pretrained(model_dir)
    processor, model = AutoProcessor.from_pretrained(proc_dir), AutoModel.from_pretrained(model_dir).eval()
    scores = []
    for p, im in zip(prompts, imgs):
        image_inputs = processor(images=[im], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=p, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append(float((model.logit_scale.exp() * (text_embs @ image_embs.T)[0])[0]))
    return {"model": model_dir, "processor": proc_dir, "scores": scores}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", required=True, help="folder of PNGs, scored in name order")
    ap.add_argument("--prompts", required=True, help="JSON list, one prompt per image")
    ap.add_argument("--sr-configs", required=True, help="sr-ray's open_clip model configs (sr-tiny-77.json)")
    ap.add_argument("--bert-vocab", required=True, help="a bert-base-uncased vocab.txt")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = sorted(f for f in os.listdir(args.images) if f.endswith(".png"))
    imgs = [Image.open(os.path.join(args.images, f)).convert("RGB") for f in names]
    with open(args.prompts) as f:
        prompts = json.load(f)
    assert len(prompts) == len(imgs), "one prompt per image"
    res = {"images": names, "prompts": prompts, "hpsv2": hps(args.out, imgs, prompts, args.sr_configs),
           "imagereward": imagereward(args.out, imgs, prompts, args.bert_vocab),
           "laion_aesthetic": aesthetic(args.out, imgs), "pickscore": pickscore(args.out, imgs, prompts)}
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("images", "prompts")})[:2000])


if __name__ == "__main__":
    main()
