"""Data in: clear errors naming file/column/row, corrupt images counted, both forms, S3."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sr_ray.core import storage
from sr_ray.core.config import to_dict
from sr_ray.demo.data import DemoConfig, ensure_demo_data, make_triplets, write_split
from sr_ray.reward.data import DataConfig, DataError, TripletPreprocessor, preflight, prompt_id, split_info
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip
from sr_ray.reward.score import pairwise_accuracy

MODEL = to_dict(ModelConfig(name="sr-tiny"))


def packed(n=8, seed=0):
    return make_triplets(n, np.random.default_rng(seed), 64, "x")


def write_paths_form(root, n=6, bad_rows=()):
    """The authors' form: prompt, pos_path, neg_path with image files under root/images (relative paths)."""
    cols = packed(n)
    (root / "images").mkdir(parents=True)
    rows = {"prompt": cols["prompt"], "pos_path": [], "neg_path": []}
    for i in range(n):
        for side in ("pos", "neg"):
            rel = f"images/{i}-{side}.png"
            data = b"not an image" if (i in bad_rows and side == "neg") else cols[f"{side}_image"][i]
            (root / rel).write_bytes(data)
            rows[f"{side}_path"].append(rel)
    pq.write_table(pa.table(rows), root / "part-0.parquet")
    return root


def test_missing_column_names_file_and_column(tmp_path):
    t = pa.table({"prompt": ["a"], "pos_image": [b"x"]})
    pq.write_table(t, tmp_path / "part-0.parquet")
    with pytest.raises(DataError, match=r"part-0.parquet lacks column\(s\) \['neg_image'\]"):
        split_info("train", str(tmp_path), DataConfig())


def test_empty_dataset_is_an_error(tmp_path):
    write_split(tmp_path, packed(0), 10)
    with pytest.raises(DataError, match="the dataset is empty"):
        split_info("val", str(tmp_path), DataConfig())


def test_bad_uris_are_named(tmp_path, s3_endpoint, s3_bucket):
    with pytest.raises(DataError, match=rf"data.train={tmp_path}/nope: no such file"):
        split_info("train", f"{tmp_path}/nope", DataConfig())
    with pytest.raises(DataError, match=rf"data.test=s3://{s3_bucket}/missing: no such file"):
        split_info("test", f"s3://{s3_bucket}/missing", DataConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        split_info("train", str(tmp_path / "empty"), DataConfig())


def test_preflight_fails_fast_on_mostly_corrupt_data(tmp_path):
    cols = packed(8)
    cols["pos_image"] = [b"garbage"] * 8
    write_split(tmp_path / "train", cols, 100)
    with pytest.raises(DataError, match=r"8 of 16 images in the first 8 rows of .*part-00000.parquet are unusable"):
        preflight(DataConfig(train=str(tmp_path / "train")))


def test_preprocessor_counts_corrupt_rows_and_keeps_shapes():
    cols = packed(6)
    cols["neg_image"][2] = b"\x89PNG broken"
    cols["pos_image"][4] = b""
    cols["prompt"][5] = "   "
    batch = {k: np.array(v, dtype=object) for k, v in cols.items()}
    out = TripletPreprocessor(MODEL, to_dict(DataConfig()))(batch)
    assert out["valid"].tolist() == [True, True, False, True, False, False]
    assert out["pos"].shape == (6, 3, 32, 32) and out["tokens"].shape == (6, 16)
    assert out["pos"][4].sum() == 0  # placeholder for a skipped row
    assert out["prompt_id"][0] == prompt_id(cols["prompt"][0]) == prompt_id("  " + cols["prompt"][0].upper())


def test_paths_form_relative_to_image_root_with_unreadable_uri(tmp_path):
    root = write_paths_form(tmp_path / "ds", n=4, bad_rows=(1,))
    cfg = DataConfig(train=str(root), image_root=str(root))
    info = split_info("train", cfg.train, cfg)
    assert info.form == "paths" and info.rows == 4
    batch = {k: np.array(v, dtype=object) for k, v in pq.read_table(root / "part-0.parquet").to_pydict().items()}
    batch["pos_path"][3] = "images/does-not-exist.png"
    out = TripletPreprocessor(MODEL, to_dict(cfg))(batch)
    assert out["valid"].tolist() == [True, False, True, False]


def test_s3_packed_split_reads(s3_endpoint, s3_bucket):
    t = pa.table(packed(5))
    fs, path = storage.resolve(f"s3://{s3_bucket}/triplets/train")
    with fs.open_output_stream(f"{path}/part-0.parquet") as f:
        pq.write_table(t, f)
    info = split_info("train", f"s3://{s3_bucket}/triplets/train", DataConfig())
    assert (info.rows, info.form, len(info.files)) == (5, "packed", 1)


def test_demo_is_deterministic_and_an_untrained_model_is_near_chance(tmp_path):
    a = ensure_demo_data(DemoConfig(source="synthetic", cache_dir=str(tmp_path / "a"), train=40, val=400, test=10))
    b = ensure_demo_data(DemoConfig(source="synthetic", cache_dir=str(tmp_path / "b"), train=40, val=400, test=10))
    ta, tb = pq.read_table(a["val"]), pq.read_table(b["val"])
    assert ta.equals(tb)
    batch = {k: np.array(v, dtype=object) for k, v in ta.to_pydict().items()}
    out = TripletPreprocessor(MODEL, to_dict(DataConfig()))(batch)
    torch.manual_seed(0)
    model = RewardModel(build_clip(ModelConfig(name="sr-tiny"))).eval()
    with torch.no_grad():
        t, p, n = model(torch.as_tensor(out["tokens"]), torch.as_tensor(out["pos"]), torch.as_tensor(out["neg"]))
    correct, count = pairwise_accuracy(RewardModel.score(t, p), RewardModel.score(t, n))
    assert count == 400
    assert 0.40 < correct / count < 0.60


def test_pairwise_accuracy_counts_ties_as_half():
    pos = torch.tensor([0.9, 0.5, 0.1, 0.3])
    neg = torch.tensor([0.1, 0.5, 0.2, 0.3])
    assert pairwise_accuracy(pos, neg) == (2.0, 4)  # 1 + 0.5 + 0 + 0.5
