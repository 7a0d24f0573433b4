"""The prompt-analysis job (paper sec. 3.3.1): how far apart are the prompts of two or more communities?

    1. read each dataset's distinct prompts (a prompt file, a triplet split, a platform log; local or s3://);
    2. keep English ones (:mod:`sr_ray.analysis.language`) and sample ``sample_per_dataset`` of them, seeded
       (the prompts are shuffled, then classified until the sample is full, so a 1M-prompt log is not all
       classified: the dropped count is of the prompts examined);
    3. cut each to its first ``first_words`` words and embed it with Sentence-BERT on Ray Data
       (:mod:`sr_ray.analysis.embed`);
    4. Ward clusters over the pooled sample (:mod:`sr_ray.analysis.cluster`);
    5. each dataset's distribution over the clusters, and KL both ways, JS, bootstrap intervals and a shuffle
       null for every pair (:mod:`sr_ray.analysis.divergence`).

The embeddings are kept under ``<out>/_embeddings/`` (keyed by the model and the prompts), so a re-run does
not embed again. Every bad input (a dataset that does not exist, has no prompt column, no English prompt, or fewer prompts in
all than ``clusters``) is a ConfigError naming it, before Ray starts. Outputs: :mod:`sr_ray.analysis.report`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from sr_ray.analysis import cluster, divergence, language, report
from sr_ray.analysis.embed import EmbedConfig, check_model, embed_texts
from sr_ray.core import storage
from sr_ray.core.config import ConfigError
from sr_ray.core.prompt_files import read_prompts
from sr_ray.core.ray_utils import init_ray

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass
class AnalyzePromptsConfig:
    datasets: list[str] = field(default_factory=list)
    """``name=uri`` per dataset (a prompt file, a triplet split or a platform log; a bare uri is named by its
    stem); empty (the job): two real public prompt sets + the simulated community's prompts."""
    sample_per_dataset: int = 6000
    """English prompts sampled per dataset (the paper: 6,000; 0: all). Fewer available: all, with a warning."""
    equal_samples: bool = False
    """When a dataset has fewer English prompts than sample_per_dataset, sample every dataset down to the
    smallest count, so each shapes the clusters equally (the paper's equal samples); off: each keeps its own."""
    first_words: int = 5
    """Each prompt is cut to its first N words before it is embedded (the paper: 5; 0: whole prompts)."""
    english_only: bool = True
    english_confidence: float = 0.9
    """Drop a prompt when langid is this sure it is another language and too few of its words are English."""
    english_vocab_share: float = 0.7
    """... too few: under this share (see sr_ray.analysis.language)."""
    clusters: int = 173
    """Ward clusters over the pooled sample (the paper: 173)."""
    smoothing: float = divergence.DEFAULT_SMOOTHING
    """Pseudo-count added to every cluster of every distribution before KL (0.5: Jeffreys)."""
    n_boot: int = 1000
    """Bootstrap resamples (and label shuffles) per pair of datasets."""
    level: float = 0.95
    max_ward_points: int = 20000
    """Ward on at most this many points (memory ~8 N^2 bytes); past it, a sample + nearest centroid."""
    tsne: bool = True
    """2-D t-SNE of the sample (tsne.png, clusters.parquet x/y); off for very large samples."""
    themes_per_dataset: int = 5
    examples_per_theme: int = 5
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    seed: int = 0
    out: str = "./runs/prompt-analysis"
    s3_endpoint: str | None = None
    ray_address: str | None = None
    progress_every_s: float = 20.0

    def __post_init__(self) -> None:
        if self.clusters < 2:
            raise ValueError("clusters must be >= 2")
        if self.sample_per_dataset < 0 or self.first_words < 0:
            raise ValueError("sample_per_dataset and first_words must be >= 0")
        if not 0 < self.level < 1 or not 0 < self.english_confidence <= 1:
            raise ValueError("level must be in (0, 1) and english_confidence in (0, 1]")
        if self.smoothing <= 0:
            raise ValueError("smoothing must be > 0 (a cluster one dataset never visits would make KL infinite)")
        if self.max_ward_points < self.clusters:
            raise ValueError("max_ward_points must be >= clusters")


def parse_datasets(items: list[str]) -> dict[str, str]:
    """{name: uri} from ``name=uri`` items (a bare uri is named by its file or folder stem)."""
    if not items:
        raise ConfigError("datasets: none given (name=uri, at least two; a prompt file, a triplet split or a "
                          "platform log); the job (sr-ray analyze_prompts) uses the public prompt sets and the "
                          "simulated community when none is given")
    out: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or "://" in name:
            name, uri = item.rstrip("/").rsplit("/", 1)[-1].split(".")[0], item
        name, uri = name.strip(), uri.strip()
        if not NAME.match(name) or not uri:
            raise ConfigError(f"datasets: {item!r}: give name=uri with a name of letters, digits, '_' or '-'")
        if name in out:
            raise ConfigError(f"datasets: the name {name!r} is given twice")
        out[name] = uri
    if len(out) < 2:
        raise ConfigError(f"datasets: {list(out)}: name at least two datasets to compare")
    return out


@dataclass
class Sample:
    prompts: list[str]
    read: int
    """Distinct prompts in the dataset."""
    examined: int
    dropped_non_english: int


def sample_dataset(name: str, uri: str, cfg: AnalyzePromptsConfig, index: int) -> Sample:
    """The seeded English sample of one dataset; ConfigError naming it when it has none."""
    distinct = list(dict.fromkeys(read_prompts(uri, cfg.s3_endpoint, what=f"datasets.{name}")))
    order = np.random.default_rng([cfg.seed, index]).permutation(len(distinct))
    shuffled = [distinct[i] for i in order]
    want = cfg.sample_per_dataset
    if cfg.english_only:
        kept, dropped, examined = language.english_only(shuffled, cfg.english_confidence, want,
                                                          cfg.english_vocab_share)
    else:
        kept, dropped, examined = (shuffled[:want] if want else shuffled), 0, len(shuffled)
    if not kept:
        raise ConfigError(f"datasets.{name}={storage.redact(uri)}: no English prompt among its {len(distinct)} "
                          f"distinct prompts (english_only=false keeps every language)")
    if want and len(kept) < want:
        log.warning("[analyze] datasets.%s: only %d English prompts of %d asked (sample_per_dataset); all are used",
                    name, len(kept), want)
    log.info("[analyze] datasets.%s: %d distinct prompts, %d examined, %d dropped as not English, %d sampled",
             name, len(distinct), examined, dropped, len(kept))
    return Sample(kept, len(distinct), examined, dropped)


def first_words(prompt: str, n: int) -> str:
    """The first ``n`` words of ``prompt`` (whitespace-separated; 0: all)."""
    return " ".join(prompt.split()[:n]) if n else prompt


def read_samples(cfg: AnalyzePromptsConfig) -> dict[str, Sample]:
    """Every dataset's sample, checked; nothing here starts Ray."""
    uris = parse_datasets(cfg.datasets)
    check_model(cfg.embed.model)
    storage.check_output_dir(cfg.out, "out", cfg.s3_endpoint)
    samples = {name: sample_dataset(name, uri, cfg, i) for i, (name, uri) in enumerate(uris.items())}
    smallest = min(len(s.prompts) for s in samples.values())
    if cfg.equal_samples and any(len(s.prompts) > smallest for s in samples.values()):
        log.warning("[analyze] equal_samples: every dataset sampled down to %d prompts", smallest)
        samples = {n: replace(s, prompts=s.prompts[:smallest]) for n, s in samples.items()}
    total = sum(len(s.prompts) for s in samples.values())
    if total < cfg.clusters:
        sizes = ", ".join(f"{n}: {len(s.prompts)}" for n, s in samples.items())
        raise ConfigError(f"clusters={cfg.clusters} but the datasets give only {total} English prompts in all "
                          f"({sizes}); lower clusters or give more prompts")
    return samples


def embeddings(cfg: AnalyzePromptsConfig, texts: list[str]) -> tuple[np.ndarray, bool]:
    """(the texts' embeddings, reused): kept in ``<out>/_embeddings/<key>.npy``, the key a hash of the model and
    the texts, so a re-run (after a crash in clustering or plotting, or with other clustering keys) does not
    embed again. Read back with ``allow_pickle=False``."""
    key = hashlib.sha256(json.dumps([cfg.embed.model, texts]).encode()).hexdigest()[:16]
    uri = storage.join(cfg.out, "_embeddings", f"{key}.npy")
    if storage.exists(uri, cfg.s3_endpoint):
        emb = np.load(io.BytesIO(storage.read_bytes(uri, cfg.s3_endpoint)), allow_pickle=False)
        if emb.shape[0] == len(texts):
            log.info("[analyze] embeddings of these %d prompts reused from %s", len(texts), uri)
            return emb, True
    started = init_ray(cfg.ray_address)
    emb = embed_texts(texts, cfg.embed, fixed_cluster=started, progress_every_s=cfg.progress_every_s)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue(), cfg.s3_endpoint)
    return emb, False


def analyze_prompts(cfg: AnalyzePromptsConfig) -> dict:
    """Run the analysis (see the module doc); returns the JSON summary."""
    t0 = time.perf_counter()
    samples = read_samples(cfg)
    frame = pd.DataFrame([(name, p) for name, s in samples.items() for p in s.prompts], columns=["dataset", "prompt"])
    frame["text"] = [first_words(p, cfg.first_words) for p in frame["prompt"]]
    emb, reused = embeddings(cfg, frame["text"].tolist())
    t_cluster = time.perf_counter()
    labels, how = cluster.cluster_points(emb, cfg.clusters, frame["dataset"].to_numpy(), cfg.max_ward_points, cfg.seed)
    frame["cluster"] = labels
    how["seconds"] = round(time.perf_counter() - t_cluster, 2)
    log.info("[analyze] %d prompts in %d clusters (%s) in %.1f s", len(frame), cfg.clusters, how["method"],
             how["seconds"])
    by_set = {name: labels[(frame["dataset"] == name).to_numpy()] for name in samples}
    div = divergence.divergence_matrix(by_set, cfg.clusters, cfg.smoothing, cfg.n_boot, cfg.level, cfg.seed)
    if cfg.tsne:
        xy = cluster.tsne_2d(emb, cfg.seed)
        frame["x"], frame["y"] = xy[:, 0], xy[:, 1]
    else:
        frame["x"] = frame["y"] = np.nan
    words = cluster.top_words(frame["text"].tolist(), labels, cfg.clusters)
    counts = {n: {"read": s.read, "examined": s.examined, "dropped_non_english": s.dropped_non_english,
                  "sampled": len(s.prompts)} for n, s in samples.items()}
    report.write_all(cfg, frame, div, words, counts, how)
    summary = {
        "datasets": list(samples), "prompts_per_dataset": {n: len(s.prompts) for n, s in samples.items()},
        "dropped_non_english": {n: s.dropped_non_english for n, s in samples.items()},
        "clusters": cfg.clusters, "clustering": how, "embeddings_reused": reused,
        "kl": {a: {b: d.as_dict() for b, d in row.items()} for a, row in div.items()},
        "out": cfg.out, "wall_s": round(time.perf_counter() - t0, 1)}
    report.write_summary(cfg, summary)
    log.info("[analyze] Table 2 (KL, nats; row || column):\n%s", report.kl_markdown(div, cfg.level))
    return summary
