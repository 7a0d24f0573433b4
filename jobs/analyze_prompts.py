"""How far apart are the prompts of two or more communities? Sentence-BERT embeddings of the first 5 words of
English prompts, Ward clusters, and the KL divergence between the datasets' cluster distributions with bootstrap
intervals (paper sec. 3.3.1, Table 2, Figs. 3, 4, 8).

    python jobs/analyze_prompts.py             # embedded default: the simulated community's prompts and two real
                                               # public prompt sets (PartiPrompts, ImageReward's test prompts)
    python jobs/analyze_prompts.py datasets=[picsart=s3://b/triplets/train,pickapic=prompts/pickapic.parquet,\\
        imagereward=prompts/ir.tsv] out=s3://b/prompt-analysis

Writes <out>/table2.md|csv, clusters.png, tsne.png, themes.md, clusters.parquet, report.md, summary.json.
The last stdout line is JSON: {"datasets", "prompts_per_dataset", "dropped_non_english", "clusters",
"kl": {p: {q: {kl, ci_low, ci_high, js, ...}}}, "out", "wall_s"}.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("analyze_prompts", argv, __doc__)


if __name__ == "__main__":
    main()
