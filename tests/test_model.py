"""Freezing: trainable counts worked out by hand from the architectures' widths."""

import pytest
import torch

from sr_ray.reward.model import ModelConfig, RewardModel, build_clip, count_params, freeze


def block(w: int) -> int:
    """One open_clip residual block of width w, MLP ratio 4: ln_1 + qkv + out_proj + ln_2 + fc + proj."""
    return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)


def head(w: int, embed: int) -> int:
    """Final layer norm (weight + bias) and projection w -> embed (no bias)."""
    return 2 * w + w * embed


# (name, vision width, text width, embed dim, vision blocks, text blocks)
ARCHS = [("sr-tiny", 64, 64, 32, 2, 2), ("sr-tiny-custom", 48, 32, 24, 3, 3)]


@pytest.mark.parametrize("name,vw,tw,emb,vb,tb", ARCHS)
@pytest.mark.parametrize("nv,nt", [(0, 1), (1, 0), (1, 1), (2, 2)])
def test_trainable_params_are_exactly_the_unfrozen_blocks(name, vw, tw, emb, vb, tb, nv, nt):
    model = build_clip(ModelConfig(name=name, unfreeze_vision_blocks=nv, unfreeze_text_blocks=nt))
    expected = (nv * block(vw) + (head(vw, emb) if nv else 0)) + (nt * block(tw) + (head(tw, emb) if nt else 0))
    trainable, total = count_params(model)
    assert trainable == expected
    assert total > trainable


def test_frozen_parameters_get_no_gradient():
    model = build_clip(ModelConfig(name="sr-tiny", unfreeze_vision_blocks=1, unfreeze_text_blocks=1))
    rm = RewardModel(model)
    tokens = torch.randint(0, 1000, (2, 16))
    t, p, n = rm(tokens, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    ((t - p).pow(2).sum() - (t - n).pow(2).sum()).backward()
    for name, prm in model.named_parameters():
        if prm.requires_grad:
            assert prm.grad is not None, name
        else:
            assert prm.grad is None, name
    assert not model.visual.conv1.weight.requires_grad
    assert model.visual.transformer.resblocks[-1].mlp.c_fc.weight.requires_grad
    assert not model.visual.transformer.resblocks[0].mlp.c_fc.weight.requires_grad
    assert model.visual.proj.requires_grad and model.text_projection.requires_grad
    assert not model.logit_scale.requires_grad


def test_whole_towers_with_minus_one():
    model = build_clip(ModelConfig(name="sr-tiny", unfreeze_vision_blocks=-1, unfreeze_text_blocks=-1))
    trainable, total = count_params(model)
    assert trainable == total - 1  # all but logit_scale, which the reward score never uses


def test_too_many_blocks_names_the_key():
    with pytest.raises(ValueError, match="unfreeze_vision_blocks=5.*only 2 blocks"):
        build_clip(ModelConfig(name="sr-tiny", unfreeze_vision_blocks=5))


def test_unknown_architecture_and_weights_rejected():
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        build_clip(ModelConfig(name="ViT-Q-99"))
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        build_clip(ModelConfig(name="sr-tiny", pretrained="laion9b"))


def test_weights_from_a_local_file(tmp_path):
    src = build_clip(ModelConfig(name="sr-tiny"))
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    loaded = build_clip(ModelConfig(name="sr-tiny", pretrained=str(path)))
    for (k, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_score_is_cosine_similarity():
    rm = RewardModel(build_clip(ModelConfig(name="sr-tiny"))).eval()
    tokens = torch.randint(0, 1000, (3, 16))
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t, p, _ = rm(tokens, img, img)
        raw_t, raw_i = rm.clip.encode_text(tokens), rm.clip.encode_image(img)
    expected = torch.nn.functional.cosine_similarity(raw_t, raw_i)
    assert torch.allclose(RewardModel.score(t, p), expected, atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_freeze_is_idempotent_and_explicit():
    model = build_clip(ModelConfig(name="sr-tiny", unfreeze_vision_blocks=-1, unfreeze_text_blocks=-1))
    freeze(model, 0, 1)
    assert count_params(model)[0] == block(64) + head(64, 32)


def test_openai_weights_need_the_quickgelu_architecture():
    """open_clip only warns when plain ViT-L-14 (GELU) is built around OpenAI's QuickGELU weights; sr-ray refuses
    the pair, before any weight is fetched, and names the architecture to use instead."""
    import open_clip

    from sr_ray.core.config import ConfigError, load_config
    from sr_ray.eval.scorers.aesthetic import AestheticConfig
    from sr_ray.eval.scorers.clip import ClipConfig
    from sr_ray.reward.model import activation_problem
    from sr_ray.reward.train import TrainRewardConfig, check_config

    assert activation_problem("ViT-L-14", "openai") == (
        "model.name='ViT-L-14' uses GELU but the 'openai' weights were trained with QuickGELU: "
        "use model.name='ViT-L-14-quickgelu'")
    assert activation_problem("ViT-L-14-quickgelu", "openai") is None
    assert activation_problem("ViT-B-32-quickgelu", "laion400m_e32") is None  # QuickGELU LAION weights exist too
    assert activation_problem("ViT-B-32", "laion2b_s34b_b79k") is None and activation_problem("ViT-L-14", None) is None
    with pytest.raises(ConfigError, match="use model.name='ViT-L-14-quickgelu'"):
        build_clip(ModelConfig(name="ViT-L-14", pretrained="openai"))  # no download: refused first
    with pytest.raises(ConfigError, match="use model.name='ViT-L-14-quickgelu'"):
        check_config(load_config(TrainRewardConfig, None, ["model.name=ViT-L-14", "model.pretrained=openai"]))
    with pytest.raises(ValueError, match="clip.model='ViT-L-14' uses GELU"):
        ClipConfig(model="ViT-L-14", pretrained="openai")
    with pytest.raises(ValueError, match="laion_aesthetic.clip_model='ViT-L-14' uses GELU"):
        AestheticConfig(clip_model="ViT-L-14", clip_pretrained="openai")
    # the architecture the paper configs name really runs QuickGELU (checked on its smaller sibling)
    act = open_clip.create_model("ViT-B-32-quickgelu").visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"
    from conftest import ROOT

    paper = load_config(TrainRewardConfig, ROOT / "jobs/configs/train_reward/paper.yaml")
    assert activation_problem(paper.model.name, paper.model.pretrained) is None


def test_paper_yaml_trains_the_authors_optimizer_set_on_vit_l14():
    """paper.yaml's trainable parameters on ViT-L/14 are exactly those the authors' AdamW receives
    (src/train_pair_pos_neg.py, mode visual_upper_layers_textual_upper_layers), by name and count."""
    import open_clip
    from conftest import ROOT

    from sr_ray.core.config import load_config
    from sr_ray.reward.train import TrainRewardConfig

    paper = load_config(TrainRewardConfig, ROOT / "jobs/configs/train_reward/paper.yaml").model
    model = open_clip.create_model(paper.name, device="meta")  # the architecture without 1.7 GB of weights
    freeze(model, paper.unfreeze_vision_blocks, paper.unfreeze_text_blocks, paper.train_image_projection)
    authors = (list(model.visual.transformer.resblocks[21:].parameters()) + list(model.visual.ln_post.parameters())
               + list(model.transformer.resblocks[10:].parameters()) + list(model.ln_final.parameters())
               + [model.text_projection])
    theirs = {name for name, p in model.named_parameters() if any(p is q for q in authors)}
    ours = {name for name, p in model.named_parameters() if p.requires_grad}
    assert ours == theirs and "visual.proj" not in ours
    assert len(ours) == 3 * 12 + 2 + 2 * 12 + 2 + 1  # 12 tensors per block, 2 per layer norm, the projection
    trainable, total = count_params(model)
    assert trainable == 3 * block(1024) + 2 * 1024 + 2 * block(768) + head(768, 768) == 52_557_824
    # sr-ray's own choice (recommended.yaml) adds the image projection, 1024 x 768
    freeze(model, paper.unfreeze_vision_blocks, paper.unfreeze_text_blocks, image_projection=True)
    assert count_params(model)[0] == trainable + 1024 * 768
