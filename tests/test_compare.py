"""The comparison job on hand-made test sets: accuracies, intervals, agreement and differences worked out
by hand; two test sets at once (triplet Parquet + HPD v2 test.json); resume; bad images; scorers by import
path inside Ray actors."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sr_ray.core import images
from sr_ray.core.config import ConfigError, load_config
from sr_ray.core.errors import DataError
from sr_ray.eval.compare import CompareConfig, accuracy_markdown, compare_rewards

RED, GREEN, MIX = (230, 20, 20), (20, 230, 20), (120, 120, 20)
REDNESS, GREENNESS = "plugin_scorers:redness", "plugin_scorers:greenness"


def png(colour, size=24) -> bytes:
    return images.encode_png(Image.new("RGB", (size, size), colour))


def triplet_set(path) -> None:
    """Prompt a: 4 pairs red>green; b: 3 pairs green>red; c: 2 red-red (a tie for every scorer); one pair the
    raters tied (red, green); one pair with a corrupt image. Redness: (4 + 0 + 2 x 1/2) / 9 = 5/9."""
    rows = [("a", RED, GREEN)] * 4 + [("b", GREEN, RED)] * 3 + [("c", RED, RED)] * 2
    cols = {"prompt": [r[0] for r in rows], "pos_image": [png(r[1]) for r in rows],
            "neg_image": [png(r[2]) for r in rows], "tie": [False] * len(rows)}
    cols["prompt"] += ["d", "e"]
    cols["pos_image"] += [png(RED), b"not an image"]
    cols["neg_image"] += [png(GREEN), png(GREEN)]
    cols["tie"] += [True, False]
    path.mkdir(parents=True)
    pq.write_table(pa.table(cols), path / "part-0.parquet", row_group_size=4)


def hpd_set(folder) -> str:
    """HPD v2 form: item 0 ranks red < mix < green (3 pairs, redness right on all), item 1 prefers green over
    red (redness wrong), item 2 has equal ranks (no pair). Redness 3/4."""
    img = folder / "test"
    img.mkdir(parents=True)
    for name, c in (("r.png", RED), ("m.png", MIX), ("g.png", GREEN)):
        (img / name).write_bytes(png(c))
    items = [{"prompt": "x", "image_path": ["g.png", "r.png", "m.png"], "rank": [3, 1, 2]},
             {"prompt": "y", "image_path": ["r.png", "g.png"], "rank": [2, 1]},
             {"prompt": "z", "image_path": ["r.png", "g.png"], "rank": [1, 1]}]
    (folder / "test.json").write_text(json.dumps(items))
    return str(folder / "test.json")


def cfg_of(tmp_path, **kw) -> CompareConfig:
    base = {"scorers": [REDNESS, GREENNESS], "out": str(tmp_path / "out"), "max_bad_image_rate": 0.2,
            "n_boot": 500, "compute": {"batch_size": 4, "cpus_per_actor": 0.25, "decode_num_cpus": 0.25}}
    return load_config(CompareConfig, None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def mtimes(folder) -> dict[str, int]:
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in sorted(os.listdir(folder))}


@pytest.mark.extended  # ~1-2 min: four jobs; the default suite keeps to its 12-minute budget
def test_two_sets_hand_values_and_resume(ray_cluster, tmp_path):
    triplet_set(tmp_path / "picsart" / "test")
    hpd = hpd_set(tmp_path / "hpd")
    cfg = cfg_of(tmp_path, test=[str(tmp_path / "picsart" / "test"), hpd])
    s = compare_rewards(cfg)
    r = s["results"]
    assert list(r) == ["picsart_test", "hpd_test"]  # equal stems: the parent folder tells them apart
    red, green = r["picsart_test"][REDNESS], r["picsart_test"][GREENNESS]
    assert red["pairs"] == 9 and green["pairs"] == 9  # rater tie and the corrupt pair left out
    assert red["accuracy"] == pytest.approx(5 / 9, abs=1e-5) and green["accuracy"] == pytest.approx(4 / 9, abs=1e-5)
    assert red["ci_low"] < red["accuracy"] < red["ci_high"]
    assert r["hpd_test"][REDNESS]["accuracy"] == pytest.approx(0.75) and r["hpd_test"][REDNESS]["pairs"] == 4
    assert r["hpd_test"][GREENNESS]["accuracy"] == pytest.approx(0.25)
    out = tmp_path / "out"
    table = pd.read_csv(out / "table.csv")
    row = table[(table["set"] == "picsart_test") & (table["scorer"] == REDNESS)].iloc[0]
    assert row["unreadable_pairs"] == 1 and row["rater_ties"] == 1 and row["tie_policy"] == "half"
    # agreement: the two orders disagree except on the red-red ties (2 of the 10 pairs both scored)
    agree = pd.read_csv(out / "agreement.csv")
    cell = agree[(agree["set"] == "picsart_test") & (agree["scorer"] == REDNESS)][GREENNESS].iloc[0]
    assert cell == pytest.approx(2 / 10)
    diff = pd.read_csv(out / "differences.csv")
    d = diff[diff["set"] == "picsart_test"].iloc[0]
    assert d["scorer"] == GREENNESS and d["reference"] == REDNESS and d["difference"] == pytest.approx(-1 / 9)
    scores = pd.read_parquet(out / "scores.parquet")
    bad = scores[scores["reason"] != ""]
    assert len(bad) == 1 and "pos" in bad["reason"].iloc[0] and np.isnan(bad[f"{REDNESS}_pos"].iloc[0])
    a = scores[(scores["set"] == "picsart_test") & (scores["prompt"] == "a")]
    assert np.allclose(a[f"{REDNESS}_pos"], (230 - 20) / 255, atol=1e-6)  # mean(R) - mean(G), by hand
    assert "picsart_test" in (out / "table.md").read_text() and (out / "accuracy.png").stat().st_size > 1000
    # a re-run reuses all four results, untouched; a scorer added is the only one scored
    before = mtimes(out / "scores" / "picsart_test")
    again = compare_rewards(cfg)
    assert again["results_reused"] == 4 and again["results"] == s["results"]
    assert mtimes(out / "scores" / "picsart_test") == before
    more = compare_rewards(cfg_of(tmp_path, test=cfg.test, scorers=[REDNESS, GREENNESS, "clip"]))
    assert more["results_reused"] == 4 and set(more["results"]["hpd_test"]) == {REDNESS, GREENNESS, "clip"}
    # changed settings of one scorer: that scorer alone is scored again
    opts = {"plugins": {REDNESS: {"scale": 2.0}}}
    scaled = compare_rewards(cfg_of(tmp_path, test=cfg.test, **opts))
    assert scaled["results_reused"] == 2
    assert scaled["results"]["picsart_test"][REDNESS]["accuracy"] == pytest.approx(5 / 9, abs=1e-5)


@pytest.mark.extended  # ~1 min: three more jobs
def test_tie_policies_and_bad_rate(ray_cluster, tmp_path):
    triplet_set(tmp_path / "t")
    s = compare_rewards(cfg_of(tmp_path, test=[str(tmp_path / "t")], ties="correct", scorers=[REDNESS]))
    assert s["results"]["t"][REDNESS]["accuracy"] == pytest.approx(6 / 9, abs=1e-5) and s["tie_policy"] == "correct"
    s = compare_rewards(cfg_of(tmp_path, test=[str(tmp_path / "t")], ties="skip", scorers=[REDNESS],
                               out=str(tmp_path / "o2")))
    assert s["results"]["t"][REDNESS]["accuracy"] == pytest.approx(4 / 7, abs=1e-5)
    assert s["results"]["t"][REDNESS]["pairs"] == 7
    with pytest.raises(DataError, match=r"test set t: 1 of 11 pairs have an unreadable image.*pair 10: pos"):
        compare_rewards(cfg_of(tmp_path, test=[str(tmp_path / "t")], scorers=[REDNESS], max_bad_image_rate=0.05,
                               out=str(tmp_path / "o3")))


def test_bad_config_named_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="scorers.*unknown scorer 'pickscor'"):
        cfg_of(tmp_path, scorers=["pickscor"])
    with pytest.raises(ConfigError, match="cannot import nowhere.module:make"):
        cfg_of(tmp_path, scorers=["nowhere.module:make"])
    with pytest.raises(ConfigError, match="ties='always'"):
        cfg_of(tmp_path, ties="always")
    with pytest.raises(ConfigError, match="clip.model='ViT-L-14'.*ViT-L-14-quickgelu"):
        cfg_of(tmp_path, clip={"model": "ViT-L-14", "pretrained": "openai"})
    (tmp_path / "a").mkdir()
    triplet_set(tmp_path / "a" / "x")
    triplet_set(tmp_path / "b" / "a" / "x")
    with pytest.raises(ConfigError, match=r"several sets would be named \['a_x'\]"):
        compare_rewards(cfg_of(tmp_path, test=[str(tmp_path / "a" / "x"), str(tmp_path / "b" / "a" / "x")]))


def test_accuracy_markdown_cells():
    t = pd.DataFrame([{"set": "s", "scorer": "m", "accuracy": 0.697, "ci_low": 0.671, "ci_high": 0.72,
                       "pairs": 1234, "tie_policy": "half"}])
    md = accuracy_markdown(t, 0.95)
    assert "| m | 69.7 [67.1, 72.0] (1,234) |" in md and "counts as: half" in md


@pytest.mark.extended  # ~40 s
def test_new_weights_at_the_same_path_are_scored_again(ray_cluster, tmp_path):
    """A result is reused only while the weights it was scored with are unchanged (a replaced head file)."""
    import torch

    triplet_set(tmp_path / "t")
    head = tmp_path / "head.pth"
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(32, 1).state_dict(), head)
    cfg = cfg_of(tmp_path, test=[str(tmp_path / "t")], scorers=["laion_aesthetic"],
                 laion_aesthetic={"weights": str(head)})
    first = compare_rewards(cfg)
    assert compare_rewards(cfg)["results_reused"] == 1
    lin = torch.nn.Linear(32, 1)
    with torch.no_grad():
        lin.weight.copy_(-torch.load(head)["weight"])  # the opposite head: every order flips
        lin.bias.zero_()
    torch.save(lin.state_dict(), head)
    os.utime(head, ns=(os.stat(head).st_atime_ns, os.stat(head).st_mtime_ns + 10**9))
    again = compare_rewards(cfg)
    assert again["results_reused"] == 0
    a, b = first["results"]["t"]["laion_aesthetic"]["accuracy"], again["results"]["t"]["laion_aesthetic"]["accuracy"]
    assert a + b == pytest.approx(1.0, abs=1e-5)  # 9 rated pairs, none tied by the head: flipped orders
