"""Every malformed input has an expected outcome (tests/corpus.py): decoded right, a counted bad row with its
reason, or a clear error naming file/row/key before Ray works; never a traceback, a hang or a silent wrong
result. The defects of issue 13 each have a test here (or next to their job's tests, named in the README)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import corpus
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT
from PIL import Image

from sr_ray.core import images, parquet, storage
from sr_ray.core.config import ConfigError, load_config, to_dict
from sr_ray.core.limits import InputLimits, clean_prompt, prompt_problem
from sr_ray.generations.score import (
    GenerationPreprocessor,
    GenerationScorer,
    ScoreConfig,
    ScoringPoolConfig,
    check_rows,
    inspect_inputs,
    score_generations,
)
from sr_ray.reward.data import DataConfig, DataError, TripletPreprocessor, preflight
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip
from sr_ray.reward.score import RewardScorer, read_checkpoint, save_model
from sr_ray.reward.train import TrainRewardConfig

MODEL = to_dict(ModelConfig(name="sr-tiny"))
GOOD = corpus.IMAGES["png"][0]


# ---------------------------------------------------------------- images and prompts, one by one


@pytest.mark.parametrize("name", list(corpus.IMAGES))
def test_every_image_case_decodes_right_or_is_a_named_bad_image(name):
    data, (kind, want) = corpus.IMAGES[name]
    if kind == "bad":
        with pytest.raises(images.BadImage, match=want):
            images.decode(data)
        return
    img = images.decode(data)
    assert img.mode == "RGB" and img.size == (48, 48)
    tol = 12 if "jpeg" in name else 2
    assert np.abs(np.array(img.getpixel((24, 24))) - np.array(want)).max() <= tol, img.getpixel((24, 24))
    corner = corpus.CORNER.get(name, (128, 128, 128) if name != "grey_png" else (128,) * 3)
    assert np.abs(np.array(img.getpixel((1, 1))) - np.array(corner)).max() <= tol


def test_a_16_bit_png_is_the_same_picture_and_score_as_its_8_bit_twin(checkpoint):
    """Defect 4: I;16 PNGs decoded as pure white (PIL clips when converting), so they scored like a white page."""
    arr8 = np.asarray(corpus.red_square(mode="L"))
    png8 = corpus._save(Image.fromarray(arr8), "PNG")
    png16 = corpus._save(Image.fromarray(arr8.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    assert np.array_equal(np.asarray(images.decode(png16)), np.asarray(images.decode(png8)))
    s16, s8 = RewardScorer(checkpoint, device="cpu").score("a red square", [png16, png8])
    assert abs(s16 - s8) < 1e-6


def test_limits_are_config_and_decide_what_is_bad():
    tight = InputLimits(max_pixels=48 * 47, max_image_bytes=10_000, max_aspect_ratio=1.5, min_image_side=49,
                        max_prompt_chars=5)
    with pytest.raises(images.BadImage, match="exceeds limits.max_pixels=2256"):
        images.decode(GOOD, tight)
    with pytest.raises(images.BadImage, match="max_image_bytes=100"):
        images.decode(GOOD, InputLimits(max_image_bytes=100))
    with pytest.raises(images.BadImage, match="image too small"):
        images.decode(GOOD, InputLimits(min_image_side=49))
    images.decode(corpus.solid(10_000, 10), InputLimits(max_aspect_ratio=1000))  # allowed when asked
    assert prompt_problem("a red square", tight).startswith("prompt of 12 characters exceeds")
    with pytest.raises(ConfigError, match="data.limits.max_pixels: must be >= 0"):
        load_config(TrainRewardConfig, None, ["data.limits.max_pixels=-5"])


@pytest.mark.parametrize("name", list(corpus.PROMPTS))
def test_every_prompt_case_is_usable_or_named(name):
    value, (kind, want) = corpus.PROMPTS[name]
    problem = prompt_problem(value)
    if kind == "ok":
        assert problem is None
    else:
        assert problem is not None and want in problem


def test_control_characters_read_as_spaces():
    assert clean_prompt("a red\x00square\x1b") == "a red square "
    from sr_ray.reward.data import preprocessing

    _, tok, _ = preprocessing(MODEL)
    assert torch.equal(tok([clean_prompt("a red\x00square")]), tok(["a red square"]))


# ---------------------------------------------------------------- the corpus through the jobs' own stages


def corpus_rows():
    """One row per image case (prompt fine) and per prompt case (image fine): (id, prompt, image, expected)."""
    rows = [(f"img-{k}", "a red square", data, kind, want) for k, (data, (kind, want)) in corpus.IMAGES.items()]
    rows += [(f"prompt-{k}", value, GOOD, kind, want) for k, (value, (kind, want)) in corpus.PROMPTS.items()]
    return rows


def test_training_preprocessor_marks_exactly_the_bad_cases():
    rows = corpus_rows()
    batch = {"prompt": np.array([r[1] for r in rows], dtype=object),
             "pos_image": np.array([r[2] for r in rows], dtype=object),
             "neg_image": np.array([GOOD] * len(rows), dtype=object)}
    out = TripletPreprocessor(MODEL, to_dict(DataConfig()))(batch)
    assert out["valid"].tolist() == [r[3] == "ok" for r in rows]
    assert np.isfinite(out["pos"]).all() and out["tokens"].shape[0] == len(rows)


def test_scoring_stages_reject_exactly_the_bad_cases_with_their_reason(checkpoint):
    from sr_ray.generations.score import checkpoint_model_config

    rows = corpus_rows()
    batch = {"generation_id": np.array([r[0] for r in rows], dtype=object),
             "prompt": np.array([r[1] for r in rows], dtype=object),
             "image": np.array([r[2] for r in rows], dtype=object)}
    prep = GenerationPreprocessor(checkpoint_model_config(checkpoint), None, None)
    out = GenerationScorer(checkpoint, device="cpu")(prep(batch))
    for (gid, _, _, kind, want), reason, score in zip(rows, out["reason"], out["score"]):
        if kind == "ok":
            assert reason == "" and np.isfinite(score), (gid, reason)
        else:
            assert want in reason and np.isnan(score), (gid, reason)


# ---------------------------------------------------------------- tables: named before Ray

def _write(path, table, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kw)
    return path


def corrupt_page(path, row_group: int, column: int) -> None:
    """Flip bytes inside one data page, leaving the footer intact (so every footer check passes)."""
    meta = pq.ParquetFile(path).metadata
    off = meta.row_group(row_group).column(column).data_page_offset
    b = bytearray(path.read_bytes())
    for i in range(off + 5, off + 60):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def triplets(n, prompt_type=pa.string()):
    return pa.table({"prompt": pa.array([f"a red square {i}" for i in range(n)], prompt_type),
                     "pos_image": [GOOD] * n, "neg_image": [corpus.IMAGES["jpeg"][0]] * n})


@pytest.mark.parametrize("case,make,message", [
    ("binary prompt (defect 5)", lambda d: _write(d / "a.parquet", pa.table({
        "prompt": pa.array([b"a red square"], pa.binary()), "pos_image": [GOOD], "neg_image": [GOOD]})),
     r"a.parquet column 'prompt' is binary, expected string"),
    ("integer image column (defect 10)", lambda d: _write(d / "a.parquet", pa.table({
        "prompt": ["p"], "pos_image": [1], "neg_image": [2]})), r"column 'pos_image' is int64, expected binary"),
    ("missing column", lambda d: _write(d / "a.parquet", pa.table({"prompt": ["p"], "pos_image": [GOOD]})),
     r"a.parquet lacks column\(s\) \['neg_image'\]"),
    ("not Parquet", lambda d: (d.mkdir(), (d / "a.parquet").write_bytes(b"hello")),
     r"a.parquet is not a readable Parquet file"),
    ("corrupted footer", lambda d: (_write(d / "a.parquet", triplets(4)),
                                    (d / "a.parquet").write_bytes((d / "a.parquet").read_bytes()[:-12] + b"\0" * 12)),
     r"a.parquet is not a readable Parquet file"),
    ("only empty files", lambda d: _write(d / "a.parquet", triplets(0)), "the dataset is empty"),
    ("two forms", lambda d: (_write(d / "a.parquet", triplets(2)), _write(d / "b.parquet", pa.table({
        "prompt": ["p"], "pos_path": ["/x"], "neg_path": ["/y"]}))), "b.parquet is in the paths form"),
    ("corrupt page in the sample", lambda d: (_write(d / "a.parquet", triplets(64), row_group_size=64),
                                               corrupt_page(d / "a.parquet", 0, 1)),
     r"a.parquet cannot be read \(corrupt Parquet data"),
])
def test_training_input_errors_are_named_before_ray(tmp_path, case, make, message):
    make(tmp_path / "train")
    with pytest.raises(DataError, match=message):
        preflight(DataConfig(train=str(tmp_path / "train")))


def test_an_empty_file_before_a_good_one_and_other_files_beside_them(tmp_path, caplog):
    """Defect 10: a 0-row file sorted first raised a bare StopIteration; a README beside shards is said, not read."""
    _write(tmp_path / "t" / "a-empty.parquet", triplets(0))
    _write(tmp_path / "t" / "b.parquet", triplets(8).append_column("extra", pa.array(range(8))))
    (tmp_path / "t" / "README.txt").write_text("notes")
    infos = preflight(DataConfig(train=str(tmp_path / "t")))
    assert infos["train"].rows == 8 and len(infos["train"].files) == 2
    assert "ignoring 1 file(s) that are not .parquet" in caplog.text and "README.txt" in caplog.text


def generations(n=3, **extra):
    cols = {"generation_id": [f"g{i}" for i in range(n)], "prompt": ["a red square"] * n, "image": [GOOD] * n}
    return pa.table({**cols, **extra})


@pytest.mark.parametrize("case,make,message", [
    ("null id (defect 6)", lambda d: _write(d / "a.parquet", pa.table({
        "generation_id": ["g0", None, "g2"], "prompt": ["p"] * 3, "image": [GOOD] * 3})),
     r"a.parquet row 1 has a null generation_id"),
    ("duplicate ids", lambda d: (_write(d / "a.parquet", generations(2)), _write(d / "b.parquet", generations(1))),
     r"generation_id 'g0' appears twice"),
    ("binary prompt (defect 5)", lambda d: _write(d / "a.parquet", pa.table({
        "generation_id": ["g0"], "prompt": pa.array([b"p"], pa.binary()), "image": [GOOD]})),
     r"column 'prompt' is binary, expected string"),
    ("id types differ across files", lambda d: (_write(d / "a.parquet", generations(1)), _write(
        d / "b.parquet", pa.table({"generation_id": [7], "prompt": ["p"], "image": [GOOD]}))),
     r"column 'generation_id' is string in .*a.parquet but int64 in .*b.parquet"),
    ("float ids", lambda d: _write(d / "a.parquet", pa.table({"generation_id": [1.5], "prompt": ["p"],
                                                              "image": [GOOD]})),
     r"column 'generation_id' is double, expected string or integer"),
    ("corrupt page outside the images", lambda d: (_write(d / "a.parquet", generations(200), row_group_size=100),
                                                    corrupt_page(d / "a.parquet", 1, 1)),
     r"a.parquet cannot be read \(corrupt Parquet data outside the image column"),
    ("no parquet at all", lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "no .parquet files there"),
])
def test_scoring_input_errors_are_named_before_ray(tmp_path, case, make, message):
    make(tmp_path / "gen")
    with pytest.raises(DataError, match=message):
        check_rows(inspect_inputs(str(tmp_path / "gen"), None), None, str(tmp_path / "gen"))


def test_an_unreadable_row_group_is_named_or_counted_never_a_bare_traceback(tmp_path, ray_cluster):
    """Defect 9's reader: a corrupt data page behind an intact footer. rows mode: the row group's rows come back
    with __error naming file and row group (ids salvaged); raise mode (curation): a DataError naming them, which
    arrives on the driver wrapped by Ray and is unwrapped to its message."""
    import pyarrow.fs as pafs
    import ray

    path = _write(tmp_path / "g" / "a.parquet", generations(150), row_group_size=50)
    corrupt_page(path, 1, 2)
    files = parquet.inspect_files(str(tmp_path / "g"), "generations")
    src = parquet.RowGroupSource(files, ["generation_id", "prompt", "image"], "generations",
                                 key_columns=["generation_id"], max_rows_per_block=20)
    blocks = src.read_unit(pafs.LocalFileSystem(), 0, 1)
    t = pa.concat_tables(blocks)
    assert [b.num_rows for b in blocks] == [20, 20, 10] and t["image"].null_count == 50
    assert t["generation_id"].to_pylist() == [f"g{i}" for i in range(50, 100)]
    assert "a.parquet row group 1 (rows 50..99) is unreadable" in t["__error"][0].as_py()
    assert pa.concat_tables(src.read_unit(pafs.LocalFileSystem(), 0, 2))["__error"].null_count == 50
    raising = parquet.RowGroupSource(files, ["generation_id", "image"], "log", on_error="raise")
    with pytest.raises(DataError, match=r"log: .*a.parquet row group 1 \(rows 50..99\) is unreadable"):
        raising.read_unit(pafs.LocalFileSystem(), 0, 1)
    with pytest.raises(Exception) as e:
        parquet.read(files, ["generation_id", "image"], "log", on_error="raise").materialize()
    err = parquet.data_error_of(e.value)
    assert err is not None and str(err).startswith("log: ") and "row group 1" in str(err)
    assert "Traceback" not in str(err) and "retried" not in str(err)
    assert ray.is_initialized()


def test_no_checkpoint_is_loaded_as_an_arbitrary_pickle():
    """Checkpoints load with weights_only=True (or DeepSpeed's engine made to): grep proves it for sr_ray."""
    import re

    def call_args(text: str, start: int) -> str:  # the text of a call's arguments, nested parentheses included
        depth, i = 0, start
        while True:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i + 1]
            i += 1

    found, loads = [], 0
    for p in (ROOT / "sr_ray").rglob("*.py"):
        text = p.read_text()
        found += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in
                  re.finditer(r"weights_only\s*=\s*False|pickle\.loads?\(|cloudpickle\.loads?\(", text)]
        for m in re.finditer(r"torch\.load\(", text):
            loads += 1
            if "weights_only=True" not in call_args(text, m.end() - 1):
                found.append(f"{p.relative_to(ROOT)}: {call_args(text, m.end() - 1)}")
    assert loads >= 5 and not found, found


def test_a_checkpoint_that_is_not_one_is_named(tmp_path):
    """Defect 12: a text file as checkpoint gave `RuntimeError: mmap ...`; a foreign pickle is refused too."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(DataError, match=r"notes.txt is not an sr-ray reward checkpoint"):
        read_checkpoint(str(tmp_path / "notes.txt"), mmap=True)
    with pytest.raises(DataError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model_config": {}, "state_dict": Evil(), "full": True}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt is not an sr-ray reward checkpoint"):
        read_checkpoint(str(tmp_path / "evil.pt"))


def test_config_values_are_checked_with_the_key_named(tmp_path):
    from sr_ray.curation.curate import CurateConfig
    from sr_ray.generations.score import ScoreConfig as SC

    with pytest.raises(ConfigError, match="unknown config key optim.learning_rate"):
        load_config(TrainRewardConfig, None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="optim.batch_size: expected an integer, got 'big'"):
        load_config(TrainRewardConfig, None, ["optim.batch_size=big"])
    for cls, key in ((TrainRewardConfig, "optim.batch_size"), (TrainRewardConfig, "scaling.cpus_per_worker"),
                     (SC, "block_rows"), (SC, "max_reject_rate"), (CurateConfig, "rows_per_shard")):
        with pytest.raises(ConfigError, match=f"{key}: must be >= 0, got -3"):
            load_config(cls, None, [f"{key}=-3"])
    assert load_config(TrainRewardConfig, None, ["model.unfreeze_vision_blocks=-1"])  # -1 means the whole tower
    # the scoring job's pool moved under compute (the shape of every actor pool); the flat keys still work
    pool = load_config(SC, None, ["min_actors=2", "max_actors=3", "batch_size=4", "use_gpu=true"]).compute
    assert (pool.num_actors, pool.max_actors, pool.batch_size, pool.use_gpu) == (2, 3, 4, True)
    with pytest.raises(ConfigError, match="batch_size is the older name of compute.batch_size"):
        load_config(SC, None, ["batch_size=4", "compute.batch_size=8"])
    with pytest.raises(ConfigError, match="compute.batch_size: must be >= 0, got -3"):
        load_config(SC, None, ["batch_size=-3"])
    with pytest.raises(ConfigError, match="max_actors must be 0"):
        load_config(SC, None, ["min_actors=3", "max_actors=2"])


def test_every_numeric_key_of_every_job_refuses_a_negative_value():
    """The negative-size rule covers every job config, not just the keys someone remembered."""
    import dataclasses
    import typing

    from sr_ray.core.config import from_dict

    def numeric_keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from numeric_keys(tp, f"{prefix}{f.name}.")
            elif tp in (int, float, int | None, float | None) and f.name not in getattr(cls, "SIGNED", ()):
                yield f"{prefix}{f.name}"

    from sr_ray.curation.curate import CurateConfig
    from sr_ray.diffusion.finetune import FinetuneSDConfig
    from sr_ray.diffusion.generate import GenerateConfig
    from sr_ray.eval.compare import CompareConfig
    from sr_ray.eval.t2i import EvaluateT2IConfig
    from sr_ray.generations.select import SelectConfig
    from sr_ray.reward.tune import TuneRewardConfig

    checked = 0
    for cls in (TrainRewardConfig, TuneRewardConfig, CurateConfig, ScoreConfig, SelectConfig, FinetuneSDConfig,
                GenerateConfig, EvaluateT2IConfig, CompareConfig):
        for key in numeric_keys(cls):
            tree: dict = {}
            node = tree
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = -1
            with pytest.raises(ConfigError, match=f"{key}: must be >= 0"):
                from_dict(cls, tree)
            checked += 1
    assert checked > 60


def test_credentials_in_a_uri_are_refused_without_being_echoed(tmp_path):
    secret = "FAKE-SECRET-in-uri-7Qz"
    for uri in (f"s3://bucket/triplets?X-Amz-Signature={secret}", f"s3://AKIAX:{secret}@bucket/triplets"):
        with pytest.raises(ConfigError) as e:
            load_config(TrainRewardConfig, None, [f"data.train={uri}"])
        assert "data.train" in str(e.value) and "credentials" in str(e.value) or "user info" in str(e.value)
        assert secret not in str(e.value)
    assert storage.redact(f"s3://u:{secret}@b/k?token={secret}&x=1") == "s3://***@b/k?token=***&x=***"


def test_an_output_that_is_a_file_is_refused_before_ray(tmp_path, monkeypatch):
    """Defect 11: out / run.storage_path naming a file gave a traceback, for scoring only after the work."""
    import sr_ray.core.ray_utils
    import sr_ray.reward.train
    from sr_ray.curation.curate import CurateConfig, curate
    from sr_ray.reward.train import train_reward

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(sr_ray.core.ray_utils, "init_ray", no_ray)
    monkeypatch.setattr(sr_ray.reward.train, "init_ray", no_ray)
    f = tmp_path / "a-file"
    f.write_text("x")
    _write(tmp_path / "gen" / "a.parquet", generations(2))
    with pytest.raises(ConfigError, match="out=.*a-file is a file"):
        score_generations(ScoreConfig(checkpoint="unused", generations=str(tmp_path / "gen"), out=str(f)))
    with pytest.raises(ConfigError, match=r"out=.*a-file/sub: .*a-file is a file"):
        score_generations(ScoreConfig(checkpoint="unused", generations=str(tmp_path / "gen"), out=str(f / "sub")))
    with pytest.raises(ConfigError, match="run.storage_path=.*a-file is a file"):
        train_reward(load_config(TrainRewardConfig, None, [f"run.storage_path={f}", f"data.train={tmp_path}"]))
    with pytest.raises(ConfigError, match="out=.*a-file is a file"):
        curate(CurateConfig(log=str(tmp_path / "gen"), out=str(f)))


def test_resources_no_node_can_hold_are_refused_not_waited_for(ray_cluster):
    """Defect 13: scaling.cpus_per_worker=100 on 2 CPUs hung with autoscaler messages."""
    from sr_ray.core.ray_utils import check_resources

    check_resources([{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1}], "fits", fixed=True)
    with pytest.raises(ConfigError, match=r"workers need 1 x \{'CPU': 100.0\}.*CPU 2, GPU 0 in all"):
        check_resources([{"CPU": 100.0}], "workers", fixed=True)
    with pytest.raises(ConfigError, match=r"3 x \{'CPU': 1.0\}"):  # each fits, together they do not
        check_resources([{"CPU": 1.0}] * 3, "workers", fixed=True)
    with pytest.raises(ConfigError, match="no node that could hold it joined within 1 s"):
        check_resources([{"GPU": 1.0}], "a GPU worker", fixed=False, wait_s=1)


# ---------------------------------------------------------------- the whole scoring job on the corpus


def write_corpus_generations(root, s3_bucket):
    """Five files of mixed schemas: every image/prompt case as bytes; every URI case; an optional column null in
    all but one row; an empty file; a corrupt image page. Plus a README and columns named path and reason."""
    import boto3

    rows = corpus_rows()
    n = len(rows)
    _write(root / "a-bytes.parquet", pa.table({
        "generation_id": [r[0] for r in rows], "prompt": [r[1] for r in rows], "image": [r[2] for r in rows],
        "path": [f"user/path/{i}" for i in range(n)], "reason": ["kept as is"] * n}))
    png = root.parent / "pics" / "ok.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(GOOD)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="pics/ok.png", Body=GOOD)
    uris = {"uri-ok-local": (str(png), "ok"), "uri-ok-s3": (f"s3://{s3_bucket}/pics/ok.png", "ok"),
            "uri-missing-local": (str(png.parent / "nope.png"), "unreadable image URI"),
            "uri-missing-s3": (f"s3://{s3_bucket}/pics/nope.png", "unreadable image URI"),
            "uri-relative": ("pics/ok.png", "relative image path"),
            "uri-https": ("https://example.com/a.png", "unsupported URI scheme"),
            "uri-gs": ("gs://bucket/a.png", "unsupported URI scheme"), "uri-null": (None, "no image bytes")}
    _write(root / "b-uris.parquet", pa.table({"generation_id": list(uris), "prompt": ["a red square"] * len(uris),
                                              "image_uri": [u for u, _ in uris.values()]}))
    # image_uri null in 299 of 300 rows next to image bytes (defect 7): one block has the column all null
    k = 300
    _write(root / "c-sparse.parquet", pa.table({
        "generation_id": [f"sparse-{i}" for i in range(k)], "prompt": ["a red square"] * k,
        "image": [GOOD] * (k - 1) + [None], "image_uri": [None] * (k - 1) + [str(png)]}), row_group_size=100)
    _write(root / "d-empty.parquet", generations(0))  # defect 15
    _write(root / "e-corrupt.parquet", pa.table({
        "generation_id": [f"page-{i}" for i in range(150)], "prompt": ["a red square"] * 150,
        "image": [GOOD] * 150}), row_group_size=50)
    corrupt_page(root / "e-corrupt.parquet", 1, 2)  # the image column of rows 50..99
    (root / "README.md").write_text("generations of the corpus")
    expect = {r[0]: (r[3] == "ok", r[4]) for r in rows}
    expect.update({g: (kind == "ok", kind) for g, (_, kind) in uris.items()})
    expect.update({f"sparse-{i}": (True, None) for i in range(k)})
    expect.update({f"page-{i}": (not 50 <= i < 100, "e-corrupt.parquet row group 1 (rows 50..99) is unreadable")
                   for i in range(150)})
    return expect


def read_all(folder):
    parts = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def test_scoring_job_on_the_corpus_counts_every_case_and_keeps_every_column(ray_cluster, checkpoint, tmp_path,
                                                                             s3_bucket, monkeypatch):
    """Defects 6, 7, 8, 9 (scoring), 14, 15 end to end: exact rejects with reasons, no crash after the work,
    the input's own columns (path, reason) and types kept, an empty file committed, a re-run without Ray."""
    expect = write_corpus_generations(tmp_path / "gen", s3_bucket)
    out = tmp_path / "scores"
    cfg = ScoreConfig(checkpoint=checkpoint, generations=str(tmp_path / "gen"), out=str(out),
                      compute=ScoringPoolConfig(batch_size=32, max_actors=1), decode_batch_size=32, block_rows=64)
    s = score_generations(cfg)
    bad = {g for g, (ok, _) in expect.items() if not ok}
    assert (s["rows"], s["rejected"], s["scored"]) == (len(expect), len(bad), len(expect) - len(bad))
    scored, rejects = read_all(out), read_all(out / "_rejects")
    assert sorted(scored["generation_id"].to_pylist()) == sorted(set(expect) - bad)
    reasons = dict(zip(rejects["generation_id"].to_pylist(), rejects["reason"].to_pylist()))
    assert set(reasons) == bad
    for g in bad:
        assert expect[g][1] in reasons[g], (g, reasons[g])
    a = pq.read_table(out / "a-bytes.parquet")
    assert a.column_names == ["generation_id", "prompt", "path", "reason", "score"]
    assert set(a["reason"].to_pylist()) == {"kept as is"} and a["path"][0].as_py().startswith("user/path/")
    assert pq.read_table(out / "d-empty.parquet").num_rows == 0
    assert np.isfinite(scored["score"].to_numpy()).all()

    # a re-run finds every shard committed, from these very files, and does not start Ray (defect 15)
    import sr_ray.core.ray_utils

    monkeypatch.setattr(sr_ray.core.ray_utils, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray")))
    again = score_generations(cfg)
    assert again["shards_skipped"] == again["shards"] == 5 and again["rows"] == s["rows"]


def test_rescoring_into_the_same_out_never_returns_the_old_scores(ray_cluster, checkpoint, tmp_path):
    """Defect 1: another checkpoint, other files of the same names, or out = the generations' parent all
    reported success having scored nothing. Now: refused, naming why, or (overwrite=true) scored again."""
    gen = tmp_path / "gen"
    _write(gen / "part-0.parquet", generations(6))
    out = tmp_path / "scores"
    base = dict(generations=str(gen), out=str(out), compute=ScoringPoolConfig(batch_size=8, max_actors=1),
                decode_batch_size=8)
    score_generations(ScoreConfig(checkpoint=checkpoint, **base))
    first = pq.read_table(out / "part-0.parquet")["score"].to_numpy()

    other = tmp_path / "other-ckpt"
    other.mkdir()
    torch.manual_seed(99)
    save_model(other, RewardModel(build_clip(ModelConfig(name="sr-tiny"))), ModelConfig(name="sr-tiny"))
    with pytest.raises(ConfigError, match=r"holds work made from other settings or inputs \(checkpoint_sha256"):
        score_generations(ScoreConfig(checkpoint=str(other), **base))
    redone = score_generations(ScoreConfig(checkpoint=str(other), overwrite=True, **base))
    assert redone["shards_skipped"] == 0
    got = pq.read_table(out / "part-0.parquet")
    want = RewardScorer(str(other), device="cpu").score(got["prompt"].to_pylist(), [GOOD] * len(got))
    assert np.allclose(got["score"].to_numpy(), want, atol=1e-5) and not np.allclose(want, first, atol=1e-3)

    gen2 = tmp_path / "gen2"  # other generations, same file name
    _write(gen2 / "part-0.parquet", generations(4))
    with pytest.raises(ConfigError, match=r"shard part-0.parquet was scored from .*gen/part-0.parquet"):
        score_generations(ScoreConfig(checkpoint=str(other), **{**base, "generations": str(gen2)}))
    with pytest.raises(ConfigError, match="overlaps generations"):
        score_generations(ScoreConfig(checkpoint=str(other), **{**base, "out": str(tmp_path)}))
    with pytest.raises(ConfigError, match="overlaps generations"):
        score_generations(ScoreConfig(checkpoint=str(other), **{**base, "out": str(gen / "scores")}))


def test_an_output_resumes_only_its_own_identity(tmp_path):
    """identity.claim, under every resumable output: new -> recorded; same -> resume; other -> refused naming the
    keys; overwrite -> deleted and started afresh; a folder of files no record describes -> refused."""
    from sr_ray.core import identity

    run = tmp_path / "run"
    ident = {"config": {"optim.lr": 0.1}, "data": {"train": [{"uri": "/d/a.parquet", "size": 10, "mtime_ns": 1}]}}
    assert identity.claim(str(run), "_id.json", ident, "run.name=r", "run.overwrite=true", False) is False
    (run / "checkpoint_1").mkdir()
    assert identity.claim(str(run), "_id.json", ident, "run.name=r", "run.overwrite=true", False) is True
    other = {**ident, "data": {"train": [{"uri": "/d/a.parquet", "size": 11, "mtime_ns": 2}]}}
    with pytest.raises(ConfigError, match=r"run.name=r: .*\(data.train differ\).*set run.overwrite=true"):
        identity.claim(str(run), "_id.json", other, "run.name=r", "run.overwrite=true", False)
    assert identity.claim(str(run), "_id.json", other, "run.name=r", "run.overwrite=true", True) is False
    assert not (run / "checkpoint_1").exists() and json.loads((run / "_id.json").read_text()) == other
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match="files that no sr-ray record describes"):
        identity.claim(str(tmp_path / "foreign"), "_id.json", ident, "out=f", "overwrite=true", False)


# ---------------------------------------------------------------- the JSON summary is the last stdout line


def test_the_summary_stays_the_last_stdout_line_whatever_prints_after_it(tmp_path):
    """Defect 16: output written to stdout after the summary (Ray's threads, atexit) goes to stderr."""
    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, os, sys, threading, time\n"
        "from dataclasses import dataclass\n"
        "from sr_ray.app.cli import run_job\n"
        "@dataclass\n"
        "class C:\n"
        "    n: int = 1\n"
        "def fn(cfg):\n"
        "    print('progress from the job itself')\n"
        "    threading.Thread(target=lambda: (time.sleep(0.5), print('late noise from a thread', flush=True))).start()\n"
        "    atexit.register(lambda: os.write(1, b'raylet warning at exit\\n'))\n"
        "    return {'n': cfg.n}\n"
        "run_job(C, fn, ['n=3'], None, 'doc')\n"
        "time.sleep(1)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ['{"n": 3}']
    assert "late noise from a thread" in p.stderr and "raylet warning at exit" in p.stderr
    assert "progress from the job itself" in p.stderr
