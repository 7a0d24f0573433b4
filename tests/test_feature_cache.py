"""Frozen-trunk feature cache: the split model computes the same function; the cache serves training."""

import math

import pytest
import torch

from sr_ray.reward import features
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip, tokenizer


@pytest.mark.parametrize("name", ["sr-tiny", "ViT-B-32"])
def test_trunk_then_head_equals_the_tower_at_every_depth(name):
    torch.manual_seed(0)
    clip = build_clip(ModelConfig(name=name, pretrained=None)).eval()
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, (tuple, list)) else clip.visual.image_size
    pixels = torch.randn(3, 3, size, size)
    ids = tokenizer(ModelConfig(name=name))(["a red cat", "two blue squares on grass", "x"])
    with torch.no_grad():
        image, text = clip.encode_image(pixels), clip.encode_text(ids)
        for d in range(features.vision_blocks(clip) + 1):
            assert torch.equal(features.image_head(clip, features.image_trunk(clip, pixels, d), d), image)
        for d in range(features.text_blocks(clip) + 1):
            assert torch.equal(features.text_head(clip, features.text_trunk(clip, ids, d), ids, d), text)
        # stored as bf16 (half the bytes), a score moves by about 1e-3 (bf16 keeps 8 bits of mantissa)
        d = features.vision_blocks(clip) - 1
        cached = features.normalize(features.image_head(clip, features.image_trunk(clip, pixels, d).bfloat16()
                                                        .float(), d))
        t = features.normalize(text)
        assert (RewardModel.score(t, cached) - RewardModel.score(t, features.normalize(image))).abs().max() < 5e-3
    with pytest.raises(ValueError, match="depth 99 outside"):
        features.image_trunk(clip, pixels, 99)


def test_a_sweep_builds_one_cache_cut_below_every_trial_and_refuses_keys_that_change_the_trunk():
    from sr_ray.core.errors import ConfigError
    from sr_ray.reward.train import TrainRewardConfig
    from sr_ray.reward.tune import TuneRewardConfig, feature_cache_bounds

    train = TrainRewardConfig(model=ModelConfig(name="ViT-B-32", unfreeze_vision_blocks=3, unfreeze_text_blocks=2))
    sweep = TuneRewardConfig(train=train, search={"model.unfreeze_vision_blocks": {"grid": [1, 6, 3]},
                                                  "loss.name": {"grid": ["triplet", "infonce"]}})
    assert feature_cache_bounds(sweep) == (6, 2)  # vision: the most any trial trains; text: the base's
    sweep.search["model.unfreeze_text_blocks"] = {"choice": [0, -1]}
    assert feature_cache_bounds(sweep) == (6, -1)  # a trial trains the whole text tower: no text cached
    with pytest.raises(ConfigError, match="search.optim.seed changes the frozen trunk"):
        feature_cache_bounds(TuneRewardConfig(train=train, search={"optim.seed": {"grid": [0, 1]}}))


def _splits(tmp_path, demo_cache, bad_rows=False):
    from sr_ray.demo.data import DemoConfig, ensure_demo_data
    from sr_ray.reward.data import DataConfig, preflight

    splits = ensure_demo_data(DemoConfig(source="synthetic", train=96, val=32, test=32, rows_per_shard=40,
                                         image_size=32, cache_dir=demo_cache))
    data = DataConfig(train=splits["train"], val=splits["val"], map_batch_size=16, map_num_cpus=0.25,
                      feature_cache=str(tmp_path / "cache"))
    return data, preflight(data)


def test_cache_rows_through_the_head_score_like_the_whole_model_and_other_trunks_are_refused(
        ray_cluster, tmp_path, demo_cache):
    """Every cached triplet, run through the head, embeds as the whole model embeds the same triplet's pixels;
    a cache is reused, serves fewer trainable blocks, and refuses another trunk."""
    import numpy as np
    import pyarrow.parquet as pq

    from sr_ray.core.config import to_dict
    from sr_ray.core.errors import ConfigError
    from sr_ray.reward import feature_cache
    from sr_ray.reward.data import TripletPreprocessor
    from sr_ray.reward.features import HeadRewardModel

    data, infos = _splits(tmp_path, demo_cache)
    val = {"val": infos["val"]}
    model = ModelConfig(name="sr-tiny", pretrained=None, unfreeze_vision_blocks=1, unfreeze_text_blocks=1)
    # built for a sweep whose trials train up to 2 vision blocks: the cut is at block 0 of sr-tiny's 2
    m = feature_cache.ensure(data.feature_cache, val, model, 7, data, max_vision_k=2, max_text_k=1)
    assert m["built_s"] > 0 and m["plan"]["image_depth"] == 0 and m["plan"]["text_depth"] == 1
    assert feature_cache.ensure(data.feature_cache, val, model, 7, data)["built_s"] == 0  # reused
    cached = sorted(feature_cache.cached_dataset(data.feature_cache, "val", m, model, data).take_all(),
                    key=lambda r: r["row"])
    table = pq.read_table(infos["val"].files, columns=["prompt", "pos_image", "neg_image"])
    rows = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    pixels = TripletPreprocessor(to_dict(model), to_dict(data))(rows)
    assert [r["row"] for r in cached] == list(range(32)) and all(r["valid"] for r in cached)

    whole = RewardModel(feature_cache.build_model(model, 7)).eval()
    head = HeadRewardModel(feature_cache.build_model(model, 7), 0, 1).eval()
    stack = {k: torch.as_tensor(np.stack([r[k] for r in cached])) for k in ("tokens", "text", "pos", "neg")}
    with torch.no_grad():
        want = whole(torch.as_tensor(pixels["tokens"]), torch.as_tensor(pixels["pos"]), torch.as_tensor(pixels["neg"]))
        got = head((stack["tokens"], stack["text"]), stack["pos"], stack["neg"])
    for w, g in zip(want, got):  # text, pos, neg embeddings of all 32 triplets, row by row (bf16 storage)
        assert (w - g).abs().max() < 2e-2
        assert (w[1:] - w[:-1]).abs().max() > 0.1  # rows differ: a row matched to another would fail
    with pytest.raises(ConfigError, match="trunk_sha256"):  # another random init: another trunk
        feature_cache.ensure(data.feature_cache, val, model, 8, data)
    # a cache cut at block 1 cannot serve a run that trains both of sr-tiny's vision blocks (it needs block 0 in)
    shallow = {**m, "plan": {**m["plan"], "image_depth": 1}}
    need = feature_cache.plan(model, 2, 1)
    want = feature_cache.identity(model, 7, need, val)
    feature_cache.check_serves(m, want, need, "c")
    with pytest.raises(ConfigError, match="entering vision block 1, but this run trains from block 0"):
        feature_cache.check_serves(shallow, want, need, "c")
    with pytest.raises(ConfigError, match="nothing to cache"):
        feature_cache.plan(ModelConfig(name="sr-tiny", pretrained=None, unfreeze_vision_blocks=-1))


@pytest.mark.extended
def test_training_job_on_the_cache_learns_like_on_pixels(ray_cluster, tmp_path):
    """The job without and with data.feature_cache (the benchmark, tiny): the cached run builds the cache once,
    trains the same head and reaches the same validation accuracy within noise."""
    from jobs.benchmark_feature_cache import main

    r = main(["model.name=sr-tiny", "model.unfreeze_vision_blocks=1", "model.unfreeze_text_blocks=1", "train=320",
              "val=160", "epochs=2", "lr=1e-3", "cpus_per_worker=0.5", "map_num_cpus=0.25",
              f"work_dir={tmp_path / 'w'}", f"cache_dir={tmp_path / 'demo'}"])
    plain, cached = r["runs"]["pixels"], r["runs"]["feature-cache"]
    assert cached["built_s"] > 0 and cached["image_depth"] == 1 and cached["text_depth"] == 1
    assert plain["val_accuracy"] > 0.6 and cached["val_accuracy"] > 0.6  # learnable data: both above chance
    # bf16 features move the trajectory a little: the two accuracies agree within the 95% interval of a
    # difference of two proportions on 160 triplets (about +-0.10 here; a cache that breaks learning sits near 0.5)
    p, q = plain["val_accuracy"], cached["val_accuracy"]
    assert abs(p - q) <= 1.96 * math.sqrt((p * (1 - p) + q * (1 - q)) / 160), (p, q)
    assert r["bytes_per_triplet"] == 2 * (2 * 17 * 64 + 16 * 64)  # sr-tiny: 17 tokens x 64 (x2 images), 16 x 64 text


def test_cache_on_s3_is_built_whole_rebuilt_when_half_written_and_read_back(ray_cluster, tmp_path, demo_cache,
                                                                             s3_bucket):
    """A cache on S3 (moto): a split whose build died half-way (files, no _SUCCESS) is emptied and built again;
    the rows read back are every triplet once."""
    import dataclasses

    import pyarrow.fs as pafs

    from sr_ray.core import storage
    from sr_ray.reward import feature_cache

    data, infos = _splits(tmp_path, demo_cache)
    uri = f"s3://{s3_bucket}/cache"
    data = dataclasses.replace(data, feature_cache=uri)
    model = ModelConfig(name="sr-tiny", pretrained=None, unfreeze_vision_blocks=1, unfreeze_text_blocks=-1)
    storage.write_text(f"{uri}/val/stale-from-a-killed-build.parquet", "not parquet")
    m = feature_cache.ensure(uri, {"val": infos["val"]}, model, 0, data)
    assert m["plan"]["text_depth"] is None and m["built_s"] > 0  # the whole text tower trains: no text cached
    fs, path = storage.resolve(f"{uri}/val")
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    assert "_SUCCESS" in names and "stale-from-a-killed-build.parquet" not in names
    rows = feature_cache.cached_dataset(uri, "val", m, model, data).take_all()
    assert sorted(int(r["row"]) for r in rows) == list(range(32)) and "text" not in rows[0]
    assert rows[0]["pos"].shape == (17, 64) and rows[0]["pos"].dtype.name == "int16"
