"""Scorers: the published formats load (local, s3:// through moto), each score equals its formula worked out
by hand on the scorer's own modules, batching changes nothing, scorers by import path, errors name the key.
(Equality with the peers' own code: tests/test_verify_scorers.py, extended.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sr_ray.core.config import ConfigError
from sr_ray.eval.scorers import ScorerSettings, check_names, make_scorer
from sr_ray.eval.scorers.aesthetic import AestheticConfig, LaionAesthetic
from sr_ray.eval.scorers.base import fetch_weights
from sr_ray.eval.scorers.hps import HPS, HPSConfig, longest_side_transform
from sr_ray.eval.scorers.imagereward import ImageReward, ImageRewardConfig, blip_tokenizer
from sr_ray.eval.scorers.pickscore import PickScore, PickScoreConfig, tiny_clip_config, tiny_processor_dir

PROMPTS = ["a red cat", "a blue house at night", "a red cat", "x"]


@pytest.fixture(scope="module")
def pics():
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((40, 40), (50, 30), (20, 70), (33, 33))]


def test_aesthetic_heads_load_in_the_published_layouts_and_score_by_hand(tmp_path, pics, s3_endpoint, s3_bucket):
    import boto3

    torch.manual_seed(3)
    lin = torch.nn.Linear(32, 1)
    torch.save(lin.state_dict(), tmp_path / "sa_0_4_linear.pth")  # keys weight, bias: LAION's file
    scorer = LaionAesthetic(AestheticConfig(weights=str(tmp_path / "sa_0_4_linear.pth")), "cpu")
    with torch.no_grad():
        e = scorer.clip.encode_image(torch.stack([scorer.transform(p) for p in pics]))
        want = (torch.nn.functional.normalize(e, dim=-1) @ lin.weight.T + lin.bias)[:, 0].numpy()
    assert np.allclose(scorer.score(PROMPTS, pics), want, atol=1e-6)
    assert np.allclose(scorer.score(["other"] * 4, pics), want, atol=1e-6)  # the prompt is ignored
    mlp = {f"layers.{i}.{k}": v for i, (o, n) in {0: (1024, 32), 2: (128, 1024), 4: (64, 128), 6: (16, 64),
                                                  7: (1, 16)}.items()
           for k, v in (("weight", torch.randn(o, n) * 0.05), ("bias", torch.zeros(o)))}
    torch.save(mlp, tmp_path / "improved.pth")  # the improved predictor's keys
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(tmp_path / "improved.pth"), s3_bucket, "h/mlp.pth")
    m = LaionAesthetic(AestheticConfig(head="mlp", weights=f"s3://{s3_bucket}/h/mlp.pth"), "cpu")
    with torch.no_grad():
        x = torch.nn.functional.normalize(e, dim=-1)
        for i in (0, 2, 4, 6, 7):
            x = x @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]  # no activations: as published
    assert np.allclose(m.score(PROMPTS, pics), x[:, 0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="laion_aesthetic.weights=.*not a mlp head on 32-d"):
        LaionAesthetic(AestheticConfig(head="mlp", weights=str(tmp_path / "sa_0_4_linear.pth")), "cpu")


def test_hps_checkpoint_format_transform_and_cosine_without_logit_scale(tmp_path, pics):
    from sr_ray.reward.model import ModelConfig, build_clip

    torch.manual_seed(5)
    clip = build_clip(ModelConfig(name="sr-tiny-77"))
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)
    state = {f"module.{k}": v for k, v in clip.state_dict().items()}  # a DDP-saved checkpoint
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "HPS.pt")
    hps = HPS(HPSConfig(weights=str(tmp_path / "HPS.pt"), model="sr-tiny-77"), "cpu")
    t = longest_side_transform(32)
    with torch.no_grad():
        im = clip.encode_image(torch.stack([t(p) for p in pics]), normalize=True)
        from open_clip import get_tokenizer
        tx = clip.encode_text(get_tokenizer("sr-tiny-77")(PROMPTS), normalize=True)
    assert np.allclose(hps.score(PROMPTS, pics), (im * tx).sum(-1).numpy(), atol=1e-6)
    # the transform by hand: a 20 x 70 image -> 9 x 32 content (70 -> 32, 20 -> round(9.14)), padded 11 + 12 rows
    x = t(pics[2])
    pad = (0 - 0.48145466) / 0.26862954
    assert x.shape == (3, 32, 32) and torch.allclose(x[0, :11], torch.tensor(pad)) and \
        torch.allclose(x[0, 20:], torch.tensor(pad)) and not torch.allclose(x[0, 11], torch.tensor(pad))
    with pytest.raises(ValueError, match="hpsv21.weights=.*does not fit open_clip sr-tiny"):
        HPS(HPSConfig(version="2.1", weights=str(tmp_path / "HPS.pt"), model="sr-tiny"), "cpu")


def test_pickscore_folders_load_and_score_is_logit_scale_times_cosine(tmp_path, pics):
    from transformers import CLIPModel

    torch.manual_seed(7)
    CLIPModel(tiny_clip_config()).save_pretrained(tmp_path / "model")
    proc = tiny_processor_dir(tmp_path / "proc")
    ps = PickScore(PickScoreConfig(model=str(tmp_path / "model"), processor=str(proc)), "cpu")
    scores = ps.score(PROMPTS, pics)
    one = [ps.score([p], [im])[0] for p, im in zip(PROMPTS, pics)]  # batching and prompt dedup change nothing
    assert np.allclose(scores, one, atol=1e-5)
    m = ps.model
    with torch.no_grad():
        tok = ps.tokenizer(["a red cat"], return_tensors="pt")
        assert tok.input_ids[0].tolist() == [49406, 320, 736, 2368, 49407]  # CLIP's ids (open_clip's vocabulary)
        t = m.get_text_features(**tok).pooler_output
        i = m.get_image_features(pixel_values=ps.images(images=[pics[0]], return_tensors="pt")["pixel_values"])
        i = i.pooler_output
        want = m.logit_scale.exp() * torch.nn.functional.cosine_similarity(t, i)
    assert scores[0] == pytest.approx(float(want[0]), abs=1e-5)


def test_imagereward_published_keys_load_and_batching_changes_nothing(tmp_path, pics):
    from sr_ray.bench.verify_scorers import bert_vocab
    from sr_ray.eval.scorers.imagereward import TINY_MED, ImageRewardModel

    tok = blip_tokenizer(str(__import__("pathlib").Path(bert_vocab()).parent))
    assert len(tok) == 30524 and tok.convert_tokens_to_ids("[ENC]") == 30523  # BLIP's init_tokenizer
    vit = {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2}
    med = {**TINY_MED, "vocab_size": 30524}
    torch.manual_seed(9)
    model = ImageRewardModel(vit, med)
    state = dict(model.state_dict())
    state["blip.vision_proj.weight"] = torch.zeros(256, 48)  # in ImageReward.pt, unused by its score
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(__import__("json").dumps({**med, "encoder_width": 768}))
    cfg = ImageRewardConfig(weights=str(tmp_path / "ImageReward.pt"), med_config=str(tmp_path / "med_config.json"),
                            tokenizer=str(__import__("pathlib").Path(bert_vocab()).parent), vit_width=48, vit_depth=2,
                            vit_heads=2, patch_size=8, image_size=32)
    ir = ImageReward(cfg, "cpu")
    s = ir.score(PROMPTS, pics)
    assert np.allclose(s, [ir.score([p], [im])[0] for p, im in zip(PROMPTS, pics)], atol=1e-5)
    enc = ir.tokenizer(["a red cat"], padding="max_length", max_length=35, truncation=True)
    assert enc.input_ids[0][:5] == [101, 1037, 2417, 4937, 102] and len(enc.input_ids[0]) == 35  # [CLS] kept
    del state["blip.text_encoder.encoder.layer.0.crossattention.self.query.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="imagereward.weights=.*broken.pt: not ImageReward-v1.0's layout"):
        ImageReward(ImageRewardConfig(**{**cfg.__dict__, "weights": str(tmp_path / "broken.pt")}), "cpu")


@pytest.mark.extended  # ~40 s; keeps the default suite under 12 minutes (.ci/run runs it after)
def test_registry_by_import_path_and_errors_naming_the_key(tmp_path, monkeypatch, pics):
    s = make_scorer("plugin_scorers:redness", ScorerSettings(plugins={"plugin_scorers:redness": {"scale": 2}}))
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    assert s.name == "plugin_scorers:redness" and s.score(["p"], [red])[0] == pytest.approx(2.0)
    for name in ("social_reward", "clip", "laion_aesthetic", "pickscore", "hpsv2", "hpsv21", "imagereward"):
        check_names([name], "scorers")
    with pytest.raises(ValueError, match="scorers: unknown scorer 'hps'; built in"):
        check_names(["hps"], "scorers")
    with pytest.raises(ValueError, match="names a scorer twice"):
        check_names(["clip", "clip"], "scorers")
    with pytest.raises(ConfigError, match="pickscore.model='/no/such/dir': no such file"):
        fetch_weights("/no/such/dir", "pickscore.model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hpsv2.weights='xswu/HPSv2/none.pt': not a local path and the hub"):
        fetch_weights("xswu/HPSv2/none.pt", "hpsv2.weights")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04\x95")
    with pytest.raises(ConfigError, match="hpsv2.weights: .*pickle.pt is not a weights file sr-ray can read"):
        HPS(HPSConfig(weights=str(tmp_path / "pickle.pt")), "cpu")
    # the random small variants all run (the demo's six metrics) and differ from one another
    st = ScorerSettings()
    outs = {n: make_scorer(n, st, "cpu").score(PROMPTS, pics) for n in
            ("clip", "laion_aesthetic", "pickscore", "hpsv2", "hpsv21", "imagereward")}
    assert all(o.shape == (4,) and np.isfinite(o).all() for o in outs.values())
    assert not np.allclose(outs["clip"], outs["hpsv2"]) and not np.allclose(outs["hpsv2"], outs["hpsv21"])
