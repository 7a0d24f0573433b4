"""The prompt analysis (paper sec. 3.3.1, Table 2): KL by hand, the bootstrap and its null, the language filter,
Ward against scikit-learn, every prompt source, bad inputs named before Ray, and a planted two-community run."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from sr_ray.analysis import cluster, divergence, language
from sr_ray.analysis import prompts as analysis
from sr_ray.analysis.prompts import AnalyzePromptsConfig, analyze_prompts, first_words, parse_datasets
from sr_ray.core.config import ConfigError, from_dict
from sr_ray.core.prompt_files import read_prompts

# ---------------------------------------------------------------- divergence


def test_kl_and_js_worked_out_by_hand_with_smoothing():
    cp, cq = np.array([3, 1, 0]), np.array([1, 1, 2])
    # a = 0.5: p = (3.5, 1.5, 0.5) / 5.5, q = (1.5, 1.5, 2.5) / 5.5
    p = divergence.smoothed(cp, 0.5)
    q = divergence.smoothed(cq, 0.5)
    assert p == pytest.approx([3.5 / 5.5, 1.5 / 5.5, 0.5 / 5.5]) and q == pytest.approx([1.5 / 5.5, 1.5 / 5.5, 2.5 / 5.5])
    kl_pq = 3.5 / 5.5 * math.log(3.5 / 1.5) + 0 + 0.5 / 5.5 * math.log(0.5 / 2.5)
    kl_qp = 1.5 / 5.5 * math.log(1.5 / 3.5) + 0 + 2.5 / 5.5 * math.log(2.5 / 0.5)
    assert divergence.kl(p, q) == pytest.approx(kl_pq) and divergence.kl(q, p) == pytest.approx(kl_qp)
    assert kl_pq == pytest.approx(0.3929, abs=1e-4) and kl_qp == pytest.approx(0.5005, abs=1e-4)  # asymmetric
    m = (p + q) / 2
    assert divergence.js(p, q) == pytest.approx((divergence.kl(p, m) + divergence.kl(q, m)) / 2)
    assert divergence.js(p, q) == pytest.approx(divergence.js(q, p)) and 0 < divergence.js(p, q) < math.log(2)
    assert divergence.kl(p, p) == 0.0
    # without smoothing a cluster that Q never visits makes KL(P || Q) infinite: why the job smooths
    assert divergence.kl(cp / 4, np.array([0.5, 0.5, 0.0])) == pytest.approx(3 / 4 * math.log(1.5) + 1 / 4 * math.log(0.5))
    assert math.isinf(divergence.kl(np.array([0.5, 0.0, 0.5]), np.array([0.5, 0.5, 0.0])))
    d = divergence.compare(cp, cq, smoothing=0.5, n_boot=200)
    assert d.kl == pytest.approx(kl_pq) and (d.n_p, d.n_q) == (4, 4)
    assert divergence.compare(cq, cp, smoothing=0.5, n_boot=200).kl == pytest.approx(kl_qp)


def test_same_source_interval_reaches_zero_and_a_real_difference_clears_the_null():
    rng = np.random.default_rng(3)
    source = rng.dirichlet(np.ones(20))
    a, b = rng.multinomial(1500, source), rng.multinomial(1500, source)
    same = divergence.compare(a, b, n_boot=1000, seed=1)
    assert 0 < same.kl < 0.02 and same.ci_low == 0.0 < same.kl <= same.ci_high  # interval covers 0
    assert same.kl < same.null_p95 and same.p_value > 0.05
    other = rng.multinomial(1500, rng.dirichlet(np.ones(20)))
    diff = divergence.compare(a, other, n_boot=1000, seed=1)
    assert diff.ci_low > 10 * diff.null_p95 and diff.ci_low <= diff.kl <= diff.ci_high and diff.p_value < 0.01
    again = divergence.compare(a, other, n_boot=1000, seed=1)
    assert again == diff  # seeded


# ---------------------------------------------------------------- language, words


def test_language_filter_on_mixed_prompts():
    english = ["a cat sitting on a red chair", "portrait of a woman, oil painting, artstation", "bond",
               "Donald Trump riding a horse, digital art", "an espresso machine that makes coffee from human souls"]
    other = ["une maison bleue dans la forêt", "ein Hund im Park bei Sonnenuntergang", "猫が椅子に座っている",
             "кошка сидит на стуле", "una ragazza con un cappello rosso nel giardino",
             "retrato de uma mulher com flores no cabelo"]
    assert [language.is_english(p) for p in english] == [True] * len(english)
    assert [language.is_english(p) for p in other] == [False] * len(other)
    assert language.latin_share("猫が椅子") == 0.0 and language.latin_share("123 !") == 1.0
    # langid alone is sure and wrong here (Dutch, 0.99); its words are English, so it stays
    assert language.language_of("deer hiding in a flower garden, soft watercolor")[0] != "en"
    assert language.vocab_share("deer hiding in a flower garden, soft watercolor") == 7 / 8  # all but "watercolor"
    kept, dropped, examined = language.english_only(other[:2] + english, want=3)
    assert kept == english[:3] and (dropped, examined) == (2, 5)  # stops once 3 are kept
    assert first_words("  a   tiny red cat made of circles ", 5) == "a tiny red cat made" and first_words("x y", 0) == "x y"


# ---------------------------------------------------------------- clustering


def blobs(n_per: int, k: int, dim: int = 16, seed: int = 0, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    truth = np.repeat(np.arange(k), n_per)
    return centres[truth] + rng.normal(size=(len(truth), dim)) * spread, truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    t = pd.crosstab(a, b)
    return bool(((t > 0).sum(axis=1) == 1).all() and ((t > 0).sum(axis=0) == 1).all())


def test_ward_equals_scikit_learn_and_the_sample_path_assigns_everyone():
    from sklearn.cluster import AgglomerativeClustering

    x, truth = blobs(40, 6, spread=1.5)  # overlapping blobs: the tree's cut matters
    ours = cluster.ward_labels(x, 9)
    ref = AgglomerativeClustering(n_clusters=9, linkage="ward").fit_predict(x)
    assert same_partition(ours, ref) and sorted(np.bincount(ours), reverse=True) == list(np.bincount(ours))
    x, truth = blobs(300, 5, seed=1)
    groups = np.where(np.arange(len(x)) % 2 == 0, "a", "b")
    labels, how = cluster.cluster_points(x, 5, groups, max_ward_points=200, seed=0)
    assert how == {"method": "ward on a sample + nearest centroid", "ward_points": 200, "assigned": 1300}
    assert same_partition(labels, truth)  # separated blobs: the nearest centroid is the true cluster
    full, how = cluster.cluster_points(x, 5, groups, max_ward_points=10_000)
    assert how["method"] == "ward" and same_partition(full, truth)
    assert cluster.nearest_centroid(np.array([[0.0, 0.1], [5.0, 5.0]]), np.array([[5.0, 4.0], [0.0, 0.0]])).tolist() == [1, 0]
    words = cluster.top_words(["red fox", "red fox runs", "blue car", "blue car and the red"], np.array([0, 0, 1, 1]), 2, 2)
    assert words == {0: ["fox", "red"], 1: ["blue", "car"]}


# ---------------------------------------------------------------- reading


def test_prompts_from_every_source(tmp_path, s3_bucket):
    split = tmp_path / "triplets" / "train"
    split.mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"prompt": [f"p{i}", "shared"], "pos_image": [b"\x89PNG", b"x"]}), split / f"part-{i}.parquet")
    assert read_prompts(str(split)) == ["p0", "shared", "p1", "shared"]
    (tmp_path / "a.jsonl").write_text('{"text": "from jsonl"}\n{"text": " "}\n')
    (tmp_path / "b.csv").write_text("caption,n\nfrom csv,1\n")
    assert read_prompts(str(tmp_path / "a.jsonl")) == ["from jsonl"] and read_prompts(str(tmp_path / "b.csv")) == ["from csv"]
    from sr_ray.core import storage

    storage.write_parquet(pa.table({"prompt": ["on s3"], "views": [3]}), f"s3://{s3_bucket}/log/part-00000.parquet")
    assert read_prompts(f"s3://{s3_bucket}/log") == ["on s3"]
    pq.write_table(pa.table({"words": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ConfigError, match=r"datasets.x: .*nocol.parquet has no prompt column.*\['words'\]"):
        read_prompts(str(tmp_path / "nocol.parquet"), what="datasets.x")
    with pytest.raises(ConfigError, match="datasets.y: .*nothere does not exist"):
        read_prompts(str(tmp_path / "nothere"), what="datasets.y")
    assert parse_datasets(["a=x.txt", "s3://b/triplets/train/"]) == {"a": "x.txt", "train": "s3://b/triplets/train/"}
    for bad, msg in ((["a=x.txt"], "at least two"), (["a=x", "a=y"], "given twice"), (["a b=x", "c=y"], "name=uri"),
                     ([], "none given")):
        with pytest.raises(ConfigError, match=msg):
            parse_datasets(bad)


def test_bad_inputs_are_named_before_ray_starts(tmp_path, monkeypatch):
    def no_ray(*a, **k):
        raise AssertionError("Ray started before the inputs were checked")

    monkeypatch.setattr(analysis, "init_ray", no_ray)
    good = tmp_path / "good.txt"
    good.write_text("\n".join(f"a photo of a dog number {i}" for i in range(30)))
    (tmp_path / "nocol.csv").write_text("id,words\n1,a cat\n")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "french.txt").write_text("une maison bleue dans la forêt\nein Hund im Park bei Sonnenuntergang\n")
    cases = [([f"good={good}", f"bad={tmp_path / 'nocol.csv'}"], {}, r"datasets.bad: .*nocol.csv has no prompt column"),
             ([f"good={good}", f"empty={tmp_path / 'empty.txt'}"], {}, r"datasets.empty: .*empty.txt holds no prompts"),
             ([f"good={good}", f"fr={tmp_path / 'french.txt'}"], {}, r"datasets.fr=.*no English prompt among its 2"),
             ([f"good={good}", f"good2={good}"], {"clusters": 61}, r"clusters=61 but the datasets give only 60 .*good: 30, good2: 30"),
             ([f"good={good}", f"gone={tmp_path / 'gone.txt'}"], {}, r"datasets.gone: .*gone.txt does not exist")]
    for datasets, extra, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            analyze_prompts(AnalyzePromptsConfig(datasets=datasets, out=str(tmp_path / "out"), **extra))
    # (each error came before init_ray: a call to it raises AssertionError, which pytest.raises would not catch)
    with pytest.raises(ConfigError, match="not a sentence-transformers model folder"):
        analyze_prompts(from_dict(AnalyzePromptsConfig, {"datasets": [f"a={good}", f"b={good}"],
                                                          "embed": {"model": str(tmp_path)}}))
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        AnalyzePromptsConfig(smoothing=0)


# ---------------------------------------------------------------- the job


ANIMALS = ["fox", "owl", "cat", "deer", "rabbit", "bear", "wolf", "otter", "hedgehog", "squirrel", "swan", "frog"]
ACTS = ["sleeping", "dancing", "reading", "singing", "painting", "dreaming", "hiding", "playing"]
PLACES = ["in a meadow", "under autumn trees", "by a misty lake", "in a flower garden", "on a mossy rock",
          "in the snowy woods", "near a waterfall", "among sunflowers"]
VEHICLES = ["truck", "tractor", "motorcycle", "forklift", "excavator", "bulldozer", "van", "scooter", "bus", "crane"]
PARTS = ["engine", "gearbox", "brake", "clutch", "radiator", "alternator", "axle", "exhaust", "piston", "turbo"]
DOCS = ["repair manual diagram", "maintenance schematic", "service blueprint", "wiring chart", "parts catalog page",
        "technical cutaway drawing", "assembly instructions", "torque specification sheet"]


def planted(kind: str, n: int, seed: int) -> list[str]:
    """Distinct prompts from one of two disjoint topic templates."""
    rng, out = np.random.default_rng(seed), {}
    while len(out) < n:
        if kind == "nature":
            p = f"{rng.choice(ANIMALS)} {rng.choice(ACTS)} {rng.choice(PLACES)}, soft watercolor"
        else:
            p = f"{rng.choice(VEHICLES)} {rng.choice(PARTS)} {rng.choice(DOCS)}, high detail"
        out[p] = None
    return list(out)


def test_planted_communities_separate_and_same_source_does_not(tmp_path, s3_bucket, ray_cluster, capsys):
    from jobs.analyze_prompts import main
    from sr_ray.core import storage

    (tmp_path / "nature_a.txt").write_text("\n".join(planted("nature", 240, 1)))
    pd.DataFrame({"prompt": planted("nature", 240, 2), "n": 1}).to_csv(tmp_path / "nature_b.tsv", sep="\t", index=False)
    storage.write_parquet(pa.table({"prompt": planted("machines", 240, 3), "pos_image": [b"img"] * 240}),
                          f"s3://{s3_bucket}/machines/train/part-00000.parquet")
    out = tmp_path / "out"
    argv = [f"datasets=[nature_a={tmp_path / 'nature_a.txt'},nature_b={tmp_path / 'nature_b.tsv'},"
            f"machines=s3://{s3_bucket}/machines/train]", "sample_per_dataset=200", "clusters=8", "n_boot=400",
            f"out={out}", "embed.cpus_per_actor=0.5", "embed.batch_size=64"]
    summary = main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    assert summary["embeddings_reused"] is False
    assert summary["datasets"] == ["nature_a", "nature_b", "machines"]
    assert summary["prompts_per_dataset"] == {"nature_a": 200, "nature_b": 200, "machines": 200}
    assert sum(summary["dropped_non_english"].values()) <= 3  # English prompts: at most a rare wrong drop
    kl = summary["kl"]
    for a in ("nature_a", "nature_b"):
        for x, y in ((a, "machines"), ("machines", a)):  # both directions, far above chance
            assert kl[x][y]["kl"] > 2.0 and kl[x][y]["ci_low"] > 5 * kl[x][y]["null_p95"], (x, y, kl[x][y])
    same = kl["nature_a"]["nature_b"]
    assert same["kl"] < 0.1 and same["ci_low"] == 0.0 and same["kl"] < same["null_p95"], same
    rows = pd.read_parquet(out / "clusters.parquet")
    assert len(rows) == 600 and list(rows.columns) == ["dataset", "prompt", "text", "cluster", "x", "y"]
    assert rows["text"].map(lambda t: len(t.split())).max() == 5 and rows[["x", "y"]].notna().all().all()
    side = rows.assign(machine=rows["dataset"] == "machines").groupby("cluster")["machine"].mean()
    assert ((side == 0) | (side == 1)).all(), side  # every cluster is one community's
    for f in ("table2.md", "table2.csv", "clusters.png", "tsne.png", "themes.md", "report.md", "summary.json"):
        assert (out / f).stat().st_size > 0, f
    themes = (out / "themes.md").read_text()
    machines_part = themes.split("## machines")[1]
    assert any(v in machines_part for v in VEHICLES) and not any(f" {a} " in machines_part for a in ANIMALS)
    csv = pd.read_csv(out / "table2.csv")
    assert len(csv) == 6 and set(csv.columns) >= {"p", "q", "kl", "ci_low", "ci_high", "js", "null_p95", "p_value"}
    dist = pd.read_csv(out / "distributions.csv")
    assert len(dist) == 8 and dist[["nature_a", "nature_b", "machines"]].sum().tolist() == pytest.approx([1, 1, 1])
    again = main(argv + ["tsne=false"])  # a re-run: the embeddings are not computed again, the same clusters
    assert again["embeddings_reused"] is True and again["kl"] == summary["kl"]
    assert pd.read_parquet(out / "clusters.parquet")["cluster"].tolist() == rows["cluster"].tolist()


@pytest.mark.extended
def test_the_default_job_on_the_public_prompt_sets(tmp_path):
    from sr_ray.app.defaults import public_prompt_dir

    if public_prompt_dir() is None:
        pytest.skip("the public prompt sets (../shared/data/prompts) are not on this machine")
    r = subprocess.run([sys.executable, "jobs/analyze_prompts.py", f"out={tmp_path}", "tsne=false", "n_boot=300"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["datasets"] == ["community", "parti", "imagereward"] and s["clusters"] == 173
    assert s["prompts_per_dataset"]["community"] == 6000 and 1500 < s["prompts_per_dataset"]["parti"] <= 1632
    ir_parti = s["kl"]["imagereward"]["parti"]
    assert ir_parti["ci_low"] > ir_parti["null_p95"]  # two real English prompt sets: a difference beyond chance
    assert s["kl"]["community"]["parti"]["kl"] > ir_parti["kl"]  # the templated community is further from both
