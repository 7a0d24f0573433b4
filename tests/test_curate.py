"""Curation rules on hand-built logs where the right answer is known, the simulated
community, the Ray Data job against the pandas reference, S3 in and out, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sr_ray.bench.curate import fit_line, format_table
from sr_ray.bench.curate_duckdb import curate_duckdb
from sr_ray.bench.curate_reference import curate_pandas
from sr_ray.core import images
from sr_ray.core.config import ConfigError
from sr_ray.curation.curate import (
    CurateConfig,
    check_log,
    cross_pairs,
    curate,
    distinct_per_group,
    linear_quantile,
    lowest_per_group,
    normalize_prompt,
    pair_rank,
    pair_ranks,
    shard_plan,
    split_of,
)
from sr_ray.demo.community import CommunityConfig, simulate
from sr_ray.reward.data import DataError


def _row(prompt, image_id, remix=0, views=10, vbfr=None, infl=False, nsfw=0.0):
    return {"image_id": image_id, "prompt": prompt, "remix_count": remix, "views": views,
            "views_before_first_remix": vbfr if remix > 0 else None, "influencer_remix": infl,
            "nsfw_score": nsfw}


def hand_log() -> list[dict]:
    """100 images. top_fraction=0.05 -> k=5; threshold_quantile=1.0 -> threshold = max vbfr in positive prompts."""
    r = [
        # content signal: the 5th largest count is 10; the tie at 10 (T1) is in, 9 (T2) is not
        _row("top", "A1", remix=50, vbfr=5), _row("top", "A2", remix=40, vbfr=100),
        _row("top", "A3", remix=30, vbfr=7), _row("top", "N_at", views=100),  # views == threshold: a negative
        _row("top", "N_below", views=99),  # just below: not a negative
        _row("top", "N_bad", views=500),  # a negative whose image is corrupt
        _row("tie", "A4", remix=20, vbfr=3), _row("tie", "T1", remix=10, vbfr=2),
        _row("tie", "T2", remix=9, vbfr=4), _row("tie", "N_tie", views=1000),
        _row("tie", "A5", remix=10, vbfr=1),
        # creator signal alone (1 remix, far below the cutoff)
        _row("creator", "C1", remix=1, vbfr=50, infl=True), _row("creator", "N_c", views=150),
        # NSFW: the most remixed image of the log, removed first; its prompt then has no positive
        _row("nsfw", "X1", remix=10_000, vbfr=1, nsfw=0.9), _row("nsfw", "X2", views=5000),
        # nothing but positives
        _row("allpos", "P1", remix=1, vbfr=1, infl=True), _row("allpos", "P2", remix=2, vbfr=1, infl=True),
        # a positive, but the only zero-remix image is under-exposed
        _row("noneg", "Q1", remix=1, vbfr=1, infl=True), _row("noneg", "Q2", views=50),
        _row("noneg", "Q3", remix=1, vbfr=3, views=400),  # remixed: never a negative
        # 3 positives x 3 negatives = 9 pairs, capped to 4
        *[_row("cap", f"K{i}", remix=1, vbfr=1, infl=True) for i in range(3)],
        *[_row("cap", f"M{i}", views=200) for i in range(3)],
        # a prompt without positive whose big vbfr must not move the threshold
        _row("nopos", "Z1", remix=3, vbfr=10_000, views=20_000), _row("nopos", "Z2", views=30_000),
    ]
    r += [_row(f"filler {i}", f"F{i}", remix=i % 3, vbfr=1, views=5) for i in range(100 - len(r) + 1)]
    return r  # 101 rows: 100 after the NSFW removal


def write_hand_log(tmp: Path, missing_image: str | None = "N_c") -> str:
    rows = hand_log()
    img_dir = tmp / "images"
    img_dir.mkdir(parents=True)
    for r in rows:
        r["image_uri"] = str(img_dir / f"{r['image_id']}.png")
        if r["image_id"] == "N_bad":
            Path(r["image_uri"]).write_bytes(b"\x89PNG not really")
        elif r["image_id"] != missing_image:
            Path(r["image_uri"]).write_bytes(images.checkerboard_png(24))
    df = pd.DataFrame(rows).astype({"views_before_first_remix": "Int64"})
    (tmp / "log").mkdir()
    pq.write_table(pa.Table.from_pandas(df.iloc[:60], preserve_index=False), tmp / "log" / "a.parquet")
    pq.write_table(pa.Table.from_pandas(df.iloc[60:], preserve_index=False), tmp / "log" / "b.parquet")
    return str(tmp / "log")


HAND_RULES = dict(top_fraction=0.05, threshold_quantile=1.0, max_pairs_per_prompt=4, rows_per_shard=4, seed=3,
                  max_bad_image_rate=0.5)  # 2 of the 17 images in pairs are bad on purpose


def _triplets(out: str, split_col: bool = True) -> set:
    found = set()
    for s in ("train", "val", "test"):
        d = Path(out) / s
        if d.exists():
            t = pq.read_table(d).to_pylist()
            found |= {(r["prompt"], r["pos_id"], r["neg_id"]) + ((s,) if split_col else ()) for r in t}
    return found


@pytest.fixture(scope="module")
def hand_curated(ray_cluster, tmp_path_factory):
    """(log, out, summary) of the hand-built log curated once with HAND_RULES."""
    tmp = tmp_path_factory.mktemp("hand")
    log = write_hand_log(tmp)
    return log, str(tmp / "out"), curate(CurateConfig(log=log, out=str(tmp / "out"), **HAND_RULES))


def test_rules_on_a_hand_built_log(hand_curated):
    _, out, s = hand_curated
    c = s["counts"]
    assert c["images"] == 101 and c["nsfw_removed"] == 1 and c["top_k"] == 5
    assert c["remix_cutoff"] == 10  # ties at 10 both in: A1 A2 A3 A4 T1 A5 = 6 content positives
    assert c["positives_content"] == 6 and c["positives_creator"] == 7 and c["positives_both"] == 0
    assert c["view_threshold"] == 100.0  # max vbfr over positive prompts; 'nopos' (10 000) and 'nsfw' excluded
    # 73 fillers + 'nopos' + 'nsfw' (its positive was removed) have no positive
    assert c["prompts"] == 81 and c["prompts_kept"] == 4
    assert c["prompts_dropped"] == {"no_positive": 75, "all_positive": 1, "no_negative": 1}
    assert c["negatives"] == 7
    def capped(prompt, pos, neg):  # the cap keeps the 4 pairs of lowest seeded rank
        return {(prompt, p, n) for _, p, n in sorted((pair_rank(3, p, n), p, n) for p in pos for n in neg)[:4]}

    selected = (capped("top", ["A1", "A2", "A3"], ["N_at", "N_bad"])  # N_below: 99 views < 100
                | capped("tie", ["A4", "T1", "A5"], ["N_tie"]) | capped("creator", ["C1"], ["N_c"])
                | capped("cap", ["K0", "K1", "K2"], ["M0", "M1", "M2"]))
    assert sum(c["triplets_selected"].values()) == len(selected) == 4 + 3 + 1 + 4
    # N_bad's image is corrupt and N_c's file is missing: their pairs are dropped and counted
    expected = {t for t in selected if t[2] not in ("N_bad", "N_c")}
    got = _triplets(out)
    assert {t[:3] for t in got} == expected
    assert all(t[3] == split_of(normalize_prompt(t[0]), [0.7, 0.1, 0.2]) for t in got)
    assert c["bad_images"] == 2 and c["dropped_pairs"] == len(selected) - len(expected) >= 2
    assert c["pairs_before_cap"] == 3 * 2 + 3 + 1 + 9
    # Table 1's shape: 19 pairs over the 4 kept prompts; 7 of the 13 positives are the creator signal's alone
    assert c["table1"]["pairs_per_prompt"] == 4.75 and c["table1"]["creator_share_of_positives"] == round(7 / 13, 5)
    card = json.loads((Path(out) / "datacard.json").read_text())
    assert card["counts"] == json.loads(json.dumps(c))
    assert (Path(out) / "REPORT.md").read_text().startswith("# Curated triplets")
    assert (Path(out) / "distributions.png").read_bytes()[:4] == b"\x89PNG"
    from PIL import Image  # paper Fig. 2: a row per kept prompt (at most 6), popular left, unpopular right
    grid = Image.open(Path(out) / "triplets.png")
    first = sorted({t[3] for t in got}, key=["train", "val", "test"].index)[0]
    n = len({t[0] for t in got if t[3] == first})
    assert grid.size == (2 * 128 + 8, 18 + min(n, 6) * (28 + 128 + 4))
    # packed images are the fetched bytes
    row = pq.read_table(Path(out) / [s for s in ("train", "val", "test") if (Path(out) / s).exists()][0]).to_pylist()[0]
    assert images.decode(row["pos_image"]).size == (24, 24)



def test_pandas_reference_agrees_on_the_hand_built_log(tmp_path):
    df = pd.read_parquet(write_hand_log(tmp_path))
    pairs, c = curate_pandas(df, CurateConfig(**HAND_RULES))
    assert c["remix_cutoff"] == 10 and c["view_threshold"] == 100.0 and c["prompts_kept"] == 4
    assert c["prompts_dropped"] == {"no_positive": 75, "all_positive": 1, "no_negative": 1}
    assert len(pairs) == 12 and c["pairs_before_cap"] == 19 and (pairs.prompt.value_counts() <= 4).all()


def test_linear_quantile_from_value_counts_equals_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 777, 1000):
        x = rng.integers(0, 50, n)
        v, c = np.unique(x, return_counts=True)
        for q in np.linspace(0, 1, 101):
            assert linear_quantile(v, c, q) == np.quantile(x.astype(np.float64), q)  # to the last bit


def test_vectorized_pair_rules_equal_their_plain_definitions():
    """The driver's array operations against loops written from the rules' text."""
    rng = np.random.default_rng(1)
    g = np.sort(rng.integers(0, 30, 400))
    is_pos = rng.random(400) < 0.3
    n_neg = np.bincount(g, weights=~is_pos, minlength=30).astype(np.int64)
    pos, neg, pg = cross_pairs(g, is_pos, n_neg)
    want = [(i, j) for i in range(400) for j in range(400) if g[i] == g[j] and is_pos[i] and not is_pos[j]]
    assert sorted(zip(pos.tolist(), neg.tolist())) == want and (g[pos] == pg).all()
    ids = [f"img-{i}" for i in range(400)]
    rank = pair_ranks(7, [ids[i] for i in pos], [ids[j] for j in neg])
    assert rank.tolist() == [pair_rank(7, ids[i], ids[j]) for i, j in zip(pos, neg)]
    keep = lowest_per_group(pg, rank, 3)
    for grp in set(pg.tolist()):
        assert sorted(rank[(pg == grp) & keep].tolist()) == sorted(rank[pg == grp].tolist())[:3]
    key = rng.integers(0, 5, len(pg))
    assert distinct_per_group(pg, key, 30).tolist() == [len(set(key[pg == k].tolist())) for k in range(30)]
    split = rng.integers(0, 3, len(pg))
    order, plan = shard_plan(split, rank, 50)
    for sp, shard, a, b in plan:  # a pair's shard: its rank modulo its split's shard count
        n = -(-int((split == ["train", "val", "test"].index(sp)).sum()) // 50)
        rows = order[a:b]
        assert (split[rows] == ["train", "val", "test"].index(sp)).all() and (rank[rows] % n == shard).all()
    assert sorted(order.tolist()) == list(range(len(pg))) and sum(b - a for *_, a, b in plan) == len(pg)


def _same_pairs(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    cols = ["prompt", "pos_id", "neg_id", "pos_uri", "neg_uri", "split"]
    return len(a) == len(b) and set(map(tuple, a[cols].to_numpy())) == set(map(tuple, b[cols].to_numpy()))


def test_duckdb_reference_equals_pandas_on_the_hand_built_log_and_a_community(tmp_path):
    log = write_hand_log(tmp_path / "hand")
    comm = simulate(CommunityConfig(images=6000, write_images=False, chunk_images=3000, seed=5), str(tmp_path / "c"))
    keys = ("images", "nsfw_removed", "remix_cutoff", "view_threshold", "prompts", "prompts_kept", "prompts_dropped",
            "positives_content", "positives_creator", "positives_both", "positives", "negatives", "pairs_before_cap",
            "table1", "triplets")
    for path, rules in ((log, HAND_RULES), (comm, dict(max_pairs_per_prompt=3)), (comm, {})):
        ref, c_ref = curate_pandas(pd.read_parquet(path), CurateConfig(**rules))
        got, c = curate_duckdb(path, CurateConfig(**rules), threads=2)
        assert _same_pairs(got, ref), (path, rules)
        assert {k: c[k] for k in keys} == {k: c_ref[k] for k in keys}
    assert len(ref) > 200


def test_benchmark_fit_and_table():
    fit = fit_line([1_000_000, 10_000_000], [20.0, 65.0])
    assert fit == {"fixed_s": 15.0, "marginal_rows_per_s": 200_000}
    r = {"cpus": 2, "fit": {"pandas": fit, "ray": fit}, "sizes": [
        {"rows": n, "triplets": 7, "sides": {k: {"wall_s": w, "rows_per_s": round(n / w), "peak_gib": 1.5}
                                             for k in ("pandas", "ray")}} for n, w in ((1_000_000, 20.0),
                                                                                     (10_000_000, 65.0))]}
    table = format_table(r)
    assert "200,000" in table and "15.0" in table and table.count("\n") == 9


def test_log_with_missing_columns_or_wrong_types_is_named(tmp_path):
    good = {"image_id": ["a"], "prompt": ["p"], "image_uri": ["u"], "remix_count": [1],
            "views_before_first_remix": [1], "views": [3], "influencer_remix": [False]}
    (tmp_path / "l1").mkdir()
    pq.write_table(pa.table({k: v for k, v in good.items() if k not in ("views", "influencer_remix")}),
                   tmp_path / "l1" / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: missing column\(s\) \['views', 'influencer_remix'\]"):
        check_log(str(tmp_path / "l1"), None)
    (tmp_path / "l2").mkdir()
    pq.write_table(pa.table({**good, "remix_count": ["many"]}), tmp_path / "l2" / "y.parquet")
    with pytest.raises(DataError, match=r"y\.parquet: wrong type\(s\): remix_count is string, expected integer"):
        check_log(str(tmp_path / "l2"), None)
    with pytest.raises(DataError, match="log=.*l3-missing: no such file or folder"):
        check_log(str(tmp_path / "l3-missing"), None)
    (tmp_path / "l4").mkdir()
    with pytest.raises(DataError, match="l4: no .parquet files"):
        check_log(str(tmp_path / "l4"), None)


def test_simulated_community_is_deterministic_heavy_tailed_and_curates_to_table1s_shape(tmp_path):
    """At the demo's size (40K images) the curated dataset has the paper's Table 1 ratios: 1.7M images, 3M pairs
    over 104K prompts = 16.3 images and 28.8 pairs per prompt, positives 8% of the dataset's images; the creator
    signal gives a minority of the positives."""
    cfg = CommunityConfig(images=40_000, write_images=False, chunk_images=15_000)
    a = pd.read_parquet(simulate(cfg, str(tmp_path / "a")))
    b = pd.read_parquet(simulate(cfg, str(tmp_path / "b")))
    pd.testing.assert_frame_equal(a.drop(columns="image_uri"), b.drop(columns="image_uri"))
    assert len(a) == 40_000 and a.image_id.is_unique
    r = a.remix_count
    assert (r == 0).mean() > 0.5 and r.max() > 20 * r[r > 0].median()  # most never remixed, a few a lot
    assert 0.001 < (a.nsfw_score >= 0.5).mean() < 0.01 and a.influencer_remix.any()
    assert a.views_before_first_remix.isna().equals(r == 0)
    assert (a.views_before_first_remix.dropna() <= a.views[r > 0]).all()
    _, c = curate_pandas(a, CurateConfig())
    t1 = c["table1"]
    assert 14 < t1["images_per_prompt"] < 19, t1
    assert 24 < t1["pairs_per_prompt"] < 36, t1
    assert 0.065 < t1["positive_share"] < 0.10, t1
    assert 0.2 < t1["creator_share_of_positives"] < 0.5, t1
    # the ratios are the counts': worked out from them by hand
    kept = c["prompts_kept"]
    assert t1["images_per_prompt"] == round((c["positives"] + c["negatives"]) / kept, 3)
    assert t1["pairs_per_prompt"] == round(c["pairs_before_cap"] / kept, 3)


def test_ray_job_equals_pandas_reference_on_a_community(ray_cluster, tmp_path):
    cfg = CommunityConfig(images=6000, write_images=False, chunk_images=3000, seed=5)
    log = simulate(cfg, str(tmp_path / "community"))
    rules = dict(max_pairs_per_prompt=3, pack=False, rows_per_shard=300)
    s = curate(CurateConfig(log=log, out=str(tmp_path / "out"), **rules))
    ref, c = curate_pandas(pd.read_parquet(log), CurateConfig(**rules))
    assert len(ref) > 200
    assert _triplets(s["out"]) == set(zip(ref.prompt, ref.pos_id, ref.neg_id, ref.split))
    for k in ("remix_cutoff", "view_threshold", "prompts", "prompts_kept", "prompts_dropped", "positives_content",
              "positives_creator", "positives_both", "pairs_before_cap", "nsfw_removed", "table1"):
        assert s["counts"][k] == c[k], k
    assert s["counts"]["triplets"] == c["triplets"]
    # authors' form: the URIs, ready for the training job
    t = pq.read_table(Path(s["out"]) / "train")
    assert t.column_names == ["prompt", "pos_id", "neg_id", "pos_path", "neg_path"]
    # prompt-disjoint splits
    seen = {}
    for p, *_, sp in _triplets(s["out"]):
        assert seen.setdefault(p, sp) == sp


@pytest.mark.extended  # ~40 s; keeps the default suite under 12 minutes (.ci/run runs it after)
def test_rerun_skips_finished_shards_and_other_rules_are_refused(hand_curated, tmp_path):
    import shutil

    log, done, first = hand_curated
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = _triplets(str(out))
    markers = sorted((out / "_shards").glob("*.json"))
    assert len(markers) >= 3
    # as if killed before the last shard finished: its marker is gone
    markers[-1].unlink()
    again = curate(CurateConfig(log=log, out=str(out), **HAND_RULES))
    assert again["resumed_shards"] == len(markers) - 1  # only the unfinished shard was packed again
    assert _triplets(str(out)) == before and again["counts"]["triplets"] == first["counts"]["triplets"]
    # the bad-image limit is judged on the finished shards too: 2 of the 17 images in pairs is too many at 5%
    with pytest.raises(DataError, match=r"2 of 17 images are unusable \(> max_bad_image_rate=0.05\)"):
        curate(CurateConfig(log=log, out=str(out), **{**HAND_RULES, "max_bad_image_rate": 0.05}))
    with pytest.raises(ConfigError, match=r"other settings or inputs \(rules.top_fraction differ\)"):
        curate(CurateConfig(log=log, out=str(out), **{**HAND_RULES, "top_fraction": 0.5}))


@pytest.mark.extended  # ~50 s; keeps the default suite under 12 minutes (S3 in/out: in the default suite for training)
def test_s3_in_and_out_with_an_nsfw_classifier(ray_cluster, tmp_path, s3_bucket):
    comm = f"s3://{s3_bucket}/community"
    log = simulate(CommunityConfig(images=300, image_size=32, chunk_images=150, seed=2), comm)
    out = f"s3://{s3_bucket}/triplets"
    s = curate(CurateConfig(log=log, out=out, top_fraction=0.05, nsfw_classifier="sr_ray.curation.nsfw:ColourShareNSFW",
                            nsfw_max=0.3, rows_per_shard=50))
    assert s["counts"]["nsfw_removed"] > 0  # pink-dominated images, as scored by the plugged-in classifier
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="triplets/")["Contents"]]
    assert "triplets/datacard.json" in keys and "triplets/distributions.png" in keys
    shards = [k for k in keys if k.startswith("triplets/train/") and k.endswith(".parquet")]
    assert shards and s["counts"]["triplets"]["train"] > 0


def test_clip_zero_shot_nsfw_hook_scores_images_in_unit_interval():
    from sr_ray.curation.nsfw import ClipZeroShotNSFW, load_classifier

    clf = load_classifier("sr_ray.curation.nsfw:ClipZeroShotNSFW")(model_name="sr-tiny", pretrained=None)
    assert isinstance(clf, ClipZeroShotNSFW)
    rng = np.random.default_rng(0)
    s = clf([images.draw("red", "circle", rng, 32), images.draw("blue", "square", rng, 32)])
    assert s.shape == (2,) and ((s >= 0) & (s <= 1)).all()
    with pytest.raises(ValueError, match="expected 'module:Class'"):
        load_classifier("sr_ray.curation.nsfw.ClipZeroShotNSFW")


def test_another_log_into_the_same_out_is_refused_and_bad_rows_are_counted(hand_curated, tmp_path):
    """Defect 2: curating another log into an existing out "resumed" every shard from the old log. Now refused
    (naming the log), or curated afresh with overwrite=true. The new log carries the corpus's bad rows: prompts
    that are null, empty, blank or oversized (dropped, counted), an image_id listed twice in a prompt (counted
    once), and image URIs that are relative or of a scheme sr-ray cannot read (bad images, counted)."""
    import shutil

    log, done, first = hand_curated
    out = tmp_path / "out"
    shutil.copytree(done, out)
    rows = hand_log()
    rows += [_row(None, "B1"), _row("", "B2"), _row("   ", "B3"), _row("x" * 20_000, "B4"),
             _row("tie", "N_tie", views=1000)]  # N_tie listed twice
    img = tmp_path / "images"
    img.mkdir()
    for r in rows:
        r["image_uri"] = str(img / f"{r['image_id']}.png")
        Path(r["image_uri"]).write_bytes(images.checkerboard_png(24))
        r["image_uri"] = {"M0": "images/M0.png", "M1": "https://example.com/M1.png"}.get(r["image_id"], r["image_uri"])
    (tmp_path / "log2").mkdir()
    df = pd.DataFrame(rows).astype({"views_before_first_remix": "Int64"})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "log2" / "all.parquet")

    with pytest.raises(ConfigError, match=r"out=.*holds work made from other settings or inputs \(log"):
        curate(CurateConfig(log=str(tmp_path / "log2"), out=str(out), **HAND_RULES))
    s = curate(CurateConfig(log=str(tmp_path / "log2"), out=str(out), overwrite=True, **HAND_RULES))
    c = s["counts"]
    assert c["images"] == 106 and c["bad_prompts"] == 4 and c["nsfw_removed"] == 1
    assert c["duplicate_image_rows"] == 1 and c["negatives"] == 7  # N_tie once
    assert set(s["bad_image_examples"]) == {"images/M0.png", "https://example.com/M1.png"}
    assert "not absolute" in s["bad_image_examples"]["images/M0.png"]
    assert "unsupported URI scheme" in s["bad_image_examples"]["https://example.com/M1.png"]
    got = _triplets(str(out))
    assert not {t for t in got if t[2] in ("M0", "M1")}
    # N_bad's image is fine in the new log, corrupt in the old: its pairs prove the folder holds the new log
    assert {t for t in got if t[2] == "N_bad"} and not {t for t in _triplets(done) if t[2] == "N_bad"}
    assert {t[0] for t in got} == {"top", "tie", "creator", "cap"}
