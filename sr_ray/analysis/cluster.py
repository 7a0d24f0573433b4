"""Ward clusters of prompt embeddings, their top words, and a t-SNE map.

Ward: ``scipy.cluster.hierarchy.linkage(method="ward")``, exact (the nearest-neighbour chain over the full
distance matrix), cut with ``fcluster(maxclust=K)``. It is what scikit-learn's
``AgglomerativeClustering(linkage="ward")`` runs itself for unstructured data (the labels are identical), minus
the wrapper; scipy also returns the whole tree, so another K is a cut, not a re-run. Its cost: time grows as
N^2 and memory as 8 N^2 bytes (the condensed matrix and its working copy): 20K points take ~3 GB, 60K ~29 GB.
So past ``max_ward_points`` the job clusters a seeded sample of that size (equal shares per dataset) and assigns
every other point to the nearest cluster centroid, which is the cluster whose Ward cost (n/(n+1) ||x - mu||^2)
grows least for a cluster of any size. ``jobs/benchmark_prompts.py`` measures where it stops fitting.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import numpy as np

log = logging.getLogger(__name__)


def ward_labels(x: np.ndarray, k: int) -> np.ndarray:
    """Ward clusters 0..k-1 of the rows of ``x`` (numbered by size, largest first)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(x) < k:
        raise ValueError(f"{len(x)} points cannot make {k} clusters")
    z = linkage(np.asarray(x, np.float64), method="ward")
    return by_size(fcluster(z, t=k, criterion="maxclust") - 1)


def by_size(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered so that cluster 0 is the largest (ties by old label)."""
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.lexsort((uniq, -counts))]
    lut = np.empty(labels.max() + 1, np.int64)
    lut[order] = np.arange(len(order))
    return lut[labels]


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) of each row of ``x``, in chunks."""
    c2 = (centroids ** 2).sum(1)
    out = np.empty(len(x), np.int64)
    for i in range(0, len(x), chunk):
        xi = x[i:i + chunk]
        out[i:i + chunk] = np.argmin(c2[None, :] - 2 * xi @ centroids.T, axis=1)
    return out


def cluster_points(x: np.ndarray, k: int, groups: np.ndarray, max_ward_points: int, seed: int = 0) -> tuple[
        np.ndarray, dict]:
    """(cluster per row, how: {method, ward_points, assigned}). Ward on all rows when they fit
    ``max_ward_points``, else on a sample with an equal share per group and nearest-centroid for the rest."""
    n = len(x)
    if n <= max_ward_points:
        return ward_labels(x, k), {"method": "ward", "ward_points": n, "assigned": 0}
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    share = max_ward_points // len(names)
    picked = np.concatenate([rng.permutation(np.flatnonzero(groups == g))[:share] for g in names])
    log.warning("[analyze] %d points exceed max_ward_points=%d: Ward on a sample of %d (%d per dataset), the "
                "other %d assigned to the nearest centroid", n, max_ward_points, len(picked), share, n - len(picked))
    sample_labels = ward_labels(x[picked], k)
    centroids = np.stack([x[picked][sample_labels == c].mean(0) for c in range(k)])
    labels = nearest_centroid(x, centroids)
    labels[picked] = sample_labels
    return labels, {"method": "ward on a sample + nearest centroid", "ward_points": int(len(picked)),
                    "assigned": int(n - len(picked))}


WORD = re.compile(r"[a-z][a-z'\-]*[a-z]")


def top_words(texts: list[str], labels: np.ndarray, k: int, n_words: int = 6) -> dict[int, list[str]]:
    """Each cluster's most characteristic words: count in the cluster x log(K / clusters using the word) + 1
    (stop words and one-letter words left out)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    per = [Counter() for _ in range(k)]
    for t, c in zip(texts, labels):
        per[c].update(w for w in WORD.findall(t.lower()) if w not in ENGLISH_STOP_WORDS)
    df = Counter(w for counter in per for w in counter)
    out = {}
    for c in range(k):
        scored = sorted(per[c].items(), key=lambda kv: (-kv[1] * (np.log(k / df[kv[0]]) + 1), kv[0]))
        out[c] = [w for w, _ in scored[:n_words]]
    return out


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (PCA to 50 dimensions first when wider; perplexity 30, or less for tiny samples)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, np.float32)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x).astype(
        np.float32)
