"""Selection of the fine-tune set: true best/worst per prompt, skips, token, regularization ratio, shards."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sr_ray.core.config import ConfigError
from sr_ray.demo.data import make_generations, make_regularization
from sr_ray.generations.select import SelectConfig, _best_worst, held_out, row_key, select_pairs, with_token
from sr_ray.reward.data import DataError


def test_best_worst_per_prompt_ties_and_nan():
    t = pa.table({"generation_id": ["a1", "a2", "a3", "b1", "b2", "c2", "c1", "d1"],
                  "prompt": ["A", "A", "A", "B", "B", "C", "C", "D"],
                  "score": [0.1, 0.5, -0.2, 0.3, float("nan"), 0.4, 0.4, 0.9]})
    got = {r["prompt"]: r for r in _best_worst(t).to_pylist()}
    assert (got["A"]["best_id"], got["A"]["worst_id"], got["A"]["images"]) == ("a2", "a3", 3)
    assert (got["B"]["best_id"], got["B"]["worst_id"], got["B"]["images"]) == ("b1", "b1", 1)  # NaN not counted
    assert (got["C"]["best_id"], got["C"]["worst_id"]) == ("c1", "c1")  # a tie: the smallest id both ways
    assert got["A"]["best_score"] == pytest.approx(0.5) and got["A"]["worst_score"] == pytest.approx(-0.2)
    assert sum(r["unscored"] for r in got.values()) == 1


def test_token_goes_where_asked():
    assert with_token("a red cat", SelectConfig()) == "a red cat, t@y quality"
    assert with_token("a red cat", SelectConfig(token="<bad>", token_position="prefix",
                                                token_separator=" ")) == "<bad> a red cat"
    with pytest.raises(ValueError, match="token must not be empty"):
        SelectConfig(token=" ")
    with pytest.raises(ValueError, match="min_images must be >= 2"):
        SelectConfig(min_images=1)


def write_inputs(root, seed=0):
    """Generations with image bytes, hand-set scores for them, and a regularization set with one corrupt row.

    Prompt k has k % 4 + 1 images (so 1..4) with scores drawn at random, except that
    prompt 3's two images score 0.50 and 0.45 (a gap of 0.05, inside the test's margin).
    """
    rng = np.random.default_rng(seed)
    gen = make_generations(24, 4, 32, seed, 0)
    keep = [i for i in range(len(gen["generation_id"])) if int(gen["generation_id"][i][-2:]) < (
        int(gen["generation_id"][i][4:10]) % 4 + 1)]
    gen = {k: [v[i] for i in keep] for k, v in gen.items()}
    # make every prompt distinct (the demo draws some twice)
    gen["prompt"] = [f"{p} #{g[4:10]}" for p, g in zip(gen["prompt"], gen["generation_id"])]
    scores = rng.uniform(-0.5, 0.8, len(keep)).round(4)
    for i, g in enumerate(gen["generation_id"]):
        if g.startswith("gen-000003-"):
            scores[i] = 0.50 if g.endswith("00") else 0.45
    (root / "gen").mkdir(parents=True)
    (root / "scores" / "_rejects").mkdir(parents=True)
    table = pa.table(gen)
    pq.write_table(table.slice(0, 30), root / "gen" / "a.parquet")
    pq.write_table(table.slice(30), root / "gen" / "b.parquet")
    st = table.drop_columns(["image"]).append_column("score", pa.array(scores, pa.float32()))
    pq.write_table(st.slice(0, 30), root / "scores" / "a.parquet")
    pq.write_table(st.slice(30), root / "scores" / "b.parquet")
    pq.write_table(pa.table({"generation_id": ["x"], "prompt": [""], "reason": ["empty prompt"]}),
                   root / "scores" / "_rejects" / "a.parquet")  # not data: the selection must not read it
    (root / "scores" / "_summary.json").write_text(json.dumps({"generations": str(root / "gen")}))
    reg = make_regularization(39, 32, seed, 1)
    pq.write_table(pa.table(reg), root / "reg.parquet", row_group_size=8)
    return gen, scores, reg


def read_set(folder):
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


@pytest.mark.extended  # ~1 min: kept out of the default suite for its 12-minute budget; .ci/run runs it
def test_selection_picks_true_best_and_worst_and_mixes_regularization(ray_cluster, tmp_path):
    gen, scores, reg = write_inputs(tmp_path)
    cfg = SelectConfig(scores=str(tmp_path / "scores"), regularization=str(tmp_path / "reg.parquet"),
                       out=str(tmp_path / "ft"), min_images=3, margin=0.1, regularization_ratio=0.5,
                       rows_per_shard=8, seed=3, val_prompts=0.25)
    summary = select_pairs(cfg)
    # the special token is recorded beside the set, for fine-tuning and generation to read
    assert json.loads((tmp_path / "ft" / "finetune_set.json").read_text()) == {"special_token": "t@y quality"}

    # by hand: per prompt with >= 3 images and best - worst > 0.1, the max and the min
    by_prompt: dict[str, list] = {}
    for g, p, s in zip(gen["generation_id"], gen["prompt"], scores):
        by_prompt.setdefault(p, []).append((s, g))
    want_best, want_worst, too_few, in_margin = {}, {}, 0, 0
    for p, rows in by_prompt.items():
        if len(rows) < 3:
            too_few += 1
        elif max(rows)[0] - min(rows)[0] <= 0.1:
            in_margin += 1
        else:
            want_best[p], want_worst[p] = max(rows)[1], min(rows)[1]
    # a seeded quarter of the selectable prompts is held out, written as internal.jsonl, not fine-tuned on
    held = sorted(p for p in want_best if held_out(3, p, 0.25))
    assert 1 <= len(held) < len(want_best) and held_out(3, held[0], 0.25) == held_out(3, held[0], 0.25)
    internal = [json.loads(line)["prompt"] for line in (tmp_path / "ft" / "internal.jsonl").read_text().splitlines()]
    assert internal == held
    for p in held:
        del want_best[p], want_worst[p]
    assert too_few == 12 and len(want_best) >= 6
    c = summary["counts"]
    assert (c["prompts"], c["prompts_too_few_images"], c["prompts_selected"]) == (24, too_few, len(want_best))
    assert c["prompts_held_out"] == len(held)
    assert c["prompts_within_margin"] == in_margin >= 1  # prompt 3: four images, best - worst = 0.05

    out = read_set(tmp_path / "ft")
    assert out.schema.names == ["prompt", "image", "source", "generation_id", "score"]
    rows = out.to_pylist()
    best = {r["prompt"]: r["generation_id"] for r in rows if r["source"] == "best"}
    worst = {r["prompt"]: r["generation_id"] for r in rows if r["source"] == "worst"}
    assert best == want_best
    assert worst == {f"{p}, t@y quality": g for p, g in want_worst.items()}
    image_of = dict(zip(gen["generation_id"], gen["image"]))
    assert all(r["image"] == image_of[r["generation_id"]] for r in rows if r["source"] != "regularization")

    # regularization: half as many rows as selected, sampled without replacement, bad bytes skipped and counted
    n_sel = 2 * len(want_best)
    regs = [r for r in rows if r["source"] == "regularization"]
    assert c["regularization_requested"] == round(0.5 * n_sel)
    assert len(regs) + c["bad_images"] == round(0.5 * n_sel) and len({r["generation_id"] for r in regs}) == len(regs)
    caption_of = {f"reg:reg:{i}": cap for i, cap in enumerate(reg["caption"])}
    image_of_reg = {f"reg:reg:{i}": img for i, img in enumerate(reg["image"])}
    assert all(r["prompt"] == caption_of[r["generation_id"]] and r["image"] == image_of_reg[r["generation_id"]]
               and r["score"] is None for r in regs)

    # shuffled: rows sit in the shard and place their seeded key gives them, so the sources interleave
    n_shards = summary["shards"]
    assert n_shards == -(-(n_sel + c["regularization_requested"]) // 8)
    for p in sorted((tmp_path / "ft").glob("part-*.parquet")):
        ids = pq.read_table(p).column("generation_id").to_pylist()
        keys = [row_key(3, g) for g in ids]
        assert keys == sorted(keys) and {k % n_shards for k in keys} == {int(p.stem[5:])}
    sources = out.column("source").to_pylist()
    assert sum(a != b for a, b in zip(sources, sources[1:])) > n_shards  # not one run per source
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["score_distribution"]["best"]["n"] == len(want_best)
    assert (tmp_path / "ft" / "score_distribution.png").read_bytes()[:4] == b"\x89PNG"

    # other settings in the same folder are refused, not mixed
    cfg.margin = 0.2
    with pytest.raises(ConfigError, match=r"holds a fine-tune set made with other settings or inputs \(margin"):
        select_pairs(cfg)
    # so are the same settings over scores re-made in the same folder (a new checkpoint, overwrite=true): the
    # finished shards would be the old scores' selection
    cfg.margin = 0.1
    first_scores = sorted(Path(cfg.scores).glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first_scores), first_scores)
    with pytest.raises(ConfigError, match=r"other settings or inputs \(inputs.scores differ\)"):
        select_pairs(cfg)


def test_bad_inputs_are_named(ray_cluster, tmp_path):
    gen, scores, _ = write_inputs(tmp_path)
    with pytest.raises(ConfigError, match="regularization: give the regularization set"):
        select_pairs(SelectConfig(scores=str(tmp_path / "scores"), out=str(tmp_path / "ft")))
    pq.write_table(pa.table({"generation_id": ["z"], "prompt": ["p"]}), tmp_path / "scores" / "c.parquet")
    with pytest.raises(DataError, match=r"scores: .*c.parquet lacks column\(s\) \['score'\]"):
        select_pairs(SelectConfig(scores=str(tmp_path / "scores"), out=str(tmp_path / "ft"),
                                  regularization_ratio=0))


@pytest.mark.extended  # ~1 min
def test_s3_in_and_out_and_a_lost_shard_is_rewritten_identically(ray_cluster, tmp_path, s3_endpoint, s3_bucket):
    import boto3

    write_inputs(tmp_path)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            key = str(p.relative_to(tmp_path))
            body = p.read_bytes()
            if key == "scores/_summary.json":
                body = json.dumps({"generations": f"s3://{s3_bucket}/gen/"}).encode()
            s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
    cfg = SelectConfig(scores=f"s3://{s3_bucket}/scores/", regularization=f"s3://{s3_bucket}/reg.parquet",
                       out=f"s3://{s3_bucket}/ft/", rows_per_shard=8, s3_endpoint=s3_endpoint)
    first = select_pairs(cfg)
    assert first["shards_skipped"] == 0 and first["counts"]["best"] >= 8
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="ft/")["Contents"])
    shards = [k for k in keys if k.startswith("ft/part-")]
    assert len(shards) == first["shards"] and "ft/report.md" in keys and "ft/score_distribution.png" in keys
    before = {k: s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in shards}

    # a run killed after a shard's stats marker but before the shard itself: only that shard is written again
    s3.delete_object(Bucket=s3_bucket, Key=shards[1])
    again = select_pairs(cfg)
    assert again["shards_skipped"] == first["shards"] - 1 and again["counts"] == first["counts"]
    assert {k: s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in shards} == before


def test_best_only_keeps_each_prompts_top_image_and_mixes_regularization_per_best_row(ray_cluster, tmp_path):
    """``worst=false`` (the closed loop's demo): the best image of every prompt with >= 2 images and a gap, no
    worst row, regularization at the ratio of the best rows alone; a folder selected the paper's way is refused."""
    gen, scores, _ = write_inputs(tmp_path)
    top: dict[str, tuple] = {}
    sizes: dict[str, int] = {}
    for g, p, s in zip(gen["generation_id"], gen["prompt"], scores):
        top[p] = max(top.get(p, (s, g)), (s, g))
        sizes[p] = sizes.get(p, 0) + 1
    want = {p: g for p, (s, g) in top.items() if sizes[p] >= 2 and p != next(q for q in top if "#000003" in q)}
    cfg = SelectConfig(scores=str(tmp_path / "scores"), regularization=str(tmp_path / "reg.parquet"),
                       out=str(tmp_path / "ft"), min_images=2, margin=0.1, regularization_ratio=1.0, worst=False,
                       rows_per_shard=8, val_prompts=0.0)
    c = select_pairs(cfg)["counts"]
    rows = read_set(tmp_path / "ft").to_pylist()
    assert {r["prompt"]: r["generation_id"] for r in rows if r["source"] == "best"} == want
    assert c["worst"] == 0 and not any("t@y" in r["prompt"] for r in rows)
    assert c["regularization_requested"] == len(want) >= 12  # one per best row, not per best + worst
    assert c["regularization"] + c["bad_images"] == len(want)
    with pytest.raises(ConfigError, match=r"other settings or inputs \(.*token differ"):
        select_pairs(SelectConfig(**{**cfg.__dict__, "worst": True}))
