"""Which unlabeled images to label next: the selection rules, on feature arrays.

Each strategy maps (pool features, labeled features and labels, class probabilities of the pool when a
model exists, budget, seed) to ``budget`` pool indices, each with the reason a person can read.

* ``random``: a seeded uniform draw, the baseline every other rule must beat.
* ``typiclust``: TypiClust (Hacohen, Dekel & Weinshall, "Active Learning on a Budget", ICML 2022,
  https://arxiv.org/abs/2202.02794). The pool is clustered into ``labeled + budget`` clusters (at most
  :data:`MAX_CLUSTERS`, clusters under :data:`MIN_CLUSTER_SIZE` images ignored, as the authors do); each pick
  takes the cluster with the fewest labeled images (the largest among ties) and, in it, the image of highest
  typicality, the inverse mean distance to its :data:`TYPICALITY_K` nearest neighbours in the cluster.
* ``probcover``: ProbCover (Yehuda et al., "Active Learning Through a Covering Lens", NeurIPS 2022,
  https://arxiv.org/abs/2205.11320). Points are L2-normalised; a ball of radius ``delta`` around each point
  covers its neighbours; greedily pick the point covering the most not-yet-covered points (labeled images cover
  theirs from the start; ties go to a seeded random point). ``delta`` is the largest radius whose balls stay 95 %
  pure for a k-means clustering into the number of classes (the authors' purity rule), searched on a 0.01 grid.
* ``margin`` / ``entropy``: uncertainty sampling on a model's class probabilities (the linear probe fitted on
  the labeled images' features, or a trained run): smallest top-1 minus top-2 probability, or highest entropy.
* ``badge``: BADGE (Ash et al., "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower Bounds", ICLR 2020,
  https://arxiv.org/abs/1906.03671): k-means++ seeding on the last layer's gradient embeddings
  ``(p - onehot(argmax p)) x features``, so picks are uncertain and unlike each other. The distances use the
  embedding's outer-product form (``<g_i, g_j> = <r_i, r_j> <x_i, x_j>``), never building the N x (C D) matrix;
  ``x`` is the pooled feature vector (the probe standardises it first; the raw features are used here).
* ``auto``: a cold-start rule while few labels exist per class, then a model-based one: the switch point
  :data:`AUTO_SWITCH_PER_CLASS` and both rules are the whole policy the simulation in ``benchmarks/suggest``
  measured best (random picks up to 5 labels per class, then margin).

Clustering and neighbour search are scikit-learn's (``MiniBatchKMeans`` / ``KMeans``, ``NearestNeighbors``);
only the selection rules above are written here, since no maintained library implements them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from visiontune.errors import ConfigError

MAX_CLUSTERS = 500
"""TypiClust's cap on the number of clusters (the authors' value), which keeps k-means cheap on big pools."""
MIN_CLUSTER_SIZE = 5
"""Clusters smaller than this are not picked from (outliers, in the authors' rule)."""
TYPICALITY_K = 20
"""Neighbours in the typicality (the authors' value)."""
PURITY = 0.95
"""ProbCover's purity threshold for choosing delta."""
DELTAS = np.round(np.arange(0.01, 1.001, 0.01), 2)
"""ProbCover's candidate radii on L2-normalised features (a fine grid: on small pools the pure radius is small)."""

AUTO_SWITCH_PER_CLASS = 5.0
"""``auto`` uses :data:`AUTO_COVERAGE` for a round that ends at no more than this many labels per class (and whenever
no model exists: a cold start, or labels of one class), :data:`AUTO_UNCERTAINTY` beyond. ``0`` would mean the
model-based rule as soon as a model exists; ``math.inf``, never.

Chosen mechanically by ``benchmarks/suggest/analyze.py --choose`` (``results/auto_choice.json``; a test holds these
constants to it) among the 12 whole policies simulated from 0 labels (6 datasets, 3 seeds, linear probe on offline
DINOv2-S features): the lowest mean over N = 20 and 50 of the labels per class needed to reach random's accuracy at N,
over N. Random to 5 labels per class, then margin needed 0.86 N at N = 20 and 0.67 N at N = 50 (per-dataset ranges
0.50-1.16 and 0.49-0.82); the runner-up, BADGE from the first labeled round, 0.91 N and 0.72 N; random to 10, then
margin (shipped before) 0.97 N and 0.72 N. No policy reached 0.8 N at N = 20. The runner-up's gap is within the noise
(chosen minus runner-up per dataset: -0.05 ± 0.03 standard error at N = 20, 3 of 6 datasets better)."""
AUTO_UNCERTAINTY = "margin"
"""The model-based rule ``auto`` uses above the switch point (see :data:`AUTO_SWITCH_PER_CLASS`): margin. Used from
the first labeled round (a probe on 2 labels per class) it trailed a random draw by 4.0 points at 5/class (mean of 6
datasets); used after 5 labels per class it led random by 0.9, 1.8, 3.2 and 3.0 points at 10, 20, 30 and 50."""
AUTO_COVERAGE = "random"
"""The rule ``auto`` uses up to the switch point: the best measured there. In the simulation TypiClust tied a random
draw at 2-10 labels per class and ProbCover trailed both, so ``auto`` falls back to random picks on a cold start;
``--strategy typiclust`` / ``probcover`` remain available."""

STRATEGIES = ("auto", "random", "typiclust", "probcover", "margin", "entropy", "badge")


@dataclass(frozen=True)
class Pick:
    """One image to label: its pool index, why it was chosen, and the strategy's score (higher = picked earlier)."""

    index: int
    reason: str
    score: float


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return name


def _fit_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(x) > 20_000:  # full k-means on 100k x 384 takes minutes; mini-batches keep it to one pass per step
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=1)
    else:
        km = KMeans(n_clusters=k, random_state=seed, n_init=1)
    return km.fit_predict(np.asarray(x, dtype=np.float32))


def random_picks(n_pool: int, budget: int, seed: int) -> list[Pick]:
    order = np.random.default_rng(seed).permutation(n_pool)[:budget]
    return [Pick(int(i), "random draw (the baseline)", 0.0) for i in order]


def typiclust(pool: np.ndarray, labeled: np.ndarray, budget: int, seed: int) -> list[Pick]:
    """TypiClust's picks from ``pool`` given the features of the ``labeled`` images (may be empty)."""
    both = np.concatenate([np.asarray(labeled, np.float32).reshape(-1, pool.shape[1]), np.asarray(pool, np.float32)])
    n_lab = len(both) - len(pool)
    k = max(1, min(n_lab + budget, MAX_CLUSTERS, len(both)))
    assign = _fit_kmeans(both, k, seed)
    sizes = np.bincount(assign, minlength=k)
    covered = np.bincount(assign[:n_lab], minlength=k)
    taken = np.zeros(len(both), dtype=bool)
    taken[:n_lab] = True
    typ_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    picks: list[Pick] = []
    big = sizes >= min(MIN_CLUSTER_SIZE, sizes.max())
    while len(picks) < budget:
        open_ = big & (sizes > covered)
        if not open_.any():
            open_ = sizes > covered
        # fewest labels first, then the largest cluster, then the lower id (deterministic)
        c = min(np.flatnonzero(open_), key=lambda c: (covered[c], -sizes[c], c))
        if c not in typ_cache:
            members = np.flatnonzero(assign == c)
            typ_cache[c] = (members, _typicality(both[members]))
        members, typ = typ_cache[c]
        free = ~taken[members]
        best = members[free][np.argmax(typ[free])]
        taken[best] = True
        covered[c] += 1
        picks.append(Pick(int(best - n_lab), f"most typical image of cluster {c} ({sizes[c]} images, "
                          f"{covered[c] - 1} labeled before)", float(typ[members == best][0])))
    return picks


def _typicality(x: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    k = min(TYPICALITY_K, len(x) - 1)
    if k < 1:
        return np.ones(len(x))
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(1) + 1e-8)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def probcover_delta(x: np.ndarray, n_classes: int, seed: int) -> float:
    """The largest radius (on L2-normalised features) whose balls are :data:`PURITY` pure for k-means(n_classes)."""
    from sklearn.neighbors import NearestNeighbors

    assign = _fit_kmeans(x, max(2, n_classes), seed)
    nn = NearestNeighbors().fit(x)
    best = float(DELTAS[0])
    for delta in DELTAS:
        graph = nn.radius_neighbors_graph(x, radius=float(delta), mode="connectivity").tocoo()
        impure = np.zeros(len(x), dtype=bool)
        np.logical_or.at(impure, graph.row, assign[graph.row] != assign[graph.col])
        if 1.0 - impure.mean() >= PURITY:
            best = float(delta)
        else:
            break
    return best


def probcover(pool: np.ndarray, labeled: np.ndarray, budget: int, seed: int, n_classes: int) -> list[Pick]:
    """ProbCover's greedy max-coverage picks (see the module docstring)."""
    from sklearn.neighbors import NearestNeighbors

    xp = _normalise(pool)
    xl = _normalise(np.asarray(labeled, np.float32).reshape(-1, pool.shape[1]))
    delta = probcover_delta(xp, n_classes, seed)
    nn = NearestNeighbors().fit(xp)
    graph = nn.radius_neighbors_graph(xp, radius=delta, mode="connectivity").tocsr()  # row i: the points i covers
    covered = np.zeros(len(xp), dtype=bool)
    if len(xl):
        for row in nn.radius_neighbors(xl, radius=delta, return_distance=False):
            covered[row] = True
    taken = np.zeros(len(xp), dtype=bool)
    gain = np.asarray(graph[:, ~covered].sum(1)).ravel() if covered.any() else np.diff(graph.indptr)
    gain = gain.astype(np.int64)
    graph_t = graph.T.tocsr()  # column view: who covers point j
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xp))  # ties go to a seeded random point, not to the first file (folders are sorted)
    picks: list[Pick] = []
    while len(picks) < budget:
        g = np.where(taken, -1, gain)
        if g.max() <= 0:  # everything covered: the rest at random, as the authors do
            rest = np.flatnonzero(~taken)
            for i in rng.permutation(rest)[: budget - len(picks)]:
                taken[i] = True
                picks.append(Pick(int(i), f"pool fully covered at radius {delta:.2f}; random fill", 0.0))
            break
        i = int(order[np.argmax(g[order])])
        new = graph.indices[graph.indptr[i]:graph.indptr[i + 1]]
        new = new[~covered[new]]
        picks.append(Pick(i, f"covers {len(new)} not-yet-covered images within radius {delta:.2f}", float(len(new))))
        taken[i] = True
        covered[new] = True
        for j in new:  # points that covered j lose one unit of gain
            gain[graph_t.indices[graph_t.indptr[j]:graph_t.indptr[j + 1]]] -= 1
    return picks


def uncertainty(probs: np.ndarray, classes: Sequence[str], budget: int, kind: str = "margin") -> list[Pick]:
    """The ``budget`` pool images with the smallest margin (or the highest entropy) of ``probs`` [N, C]."""
    probs = np.asarray(probs, np.float64)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    rows = np.arange(len(probs))
    p1, p2 = probs[rows, top2[:, 0]], probs[rows, top2[:, 1]] if probs.shape[1] > 1 else np.zeros(len(probs))
    if kind == "margin":
        score = -(p1 - p2)
    else:
        score = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
    order = np.lexsort((rows, -score))[:budget]  # ties by index: deterministic
    out = []
    for i in order:
        a, b = classes[top2[i, 0]], classes[top2[i, 1]] if probs.shape[1] > 1 else "-"
        if kind == "margin":
            why = f"margin {p1[i] - p2[i]:.3f} between {a} and {b}"
        else:
            why = f"entropy {score[i]:.3f} (most likely {a} {p1[i]:.2f}, then {b} {p2[i]:.2f})"
        out.append(Pick(int(i), why, float(score[i])))
    return out


def badge(pool: np.ndarray, probs: np.ndarray, classes: Sequence[str], budget: int, seed: int) -> list[Pick]:
    """BADGE's picks: k-means++ seeding on gradient embeddings (see the module docstring)."""
    x = np.asarray(pool, np.float32)
    p = np.asarray(probs, np.float64)
    rows = np.arange(len(p))
    pred = p.argmax(1)
    r = p.copy()
    r[rows, pred] -= 1.0
    rn, xn = (r * r).sum(1), (x.astype(np.float64) ** 2).sum(1)
    norm = rn * xn

    def dist2(c: int) -> np.ndarray:
        return np.maximum(norm + norm[c] - 2.0 * (r @ r[c]) * (x @ x[c]).astype(np.float64), 0.0)

    rng = np.random.default_rng(seed)
    c = int(np.argmax(norm))  # the authors' first centre: the largest gradient
    chosen = [c]
    d2 = dist2(c)
    while len(chosen) < budget:
        d2[chosen] = 0.0
        total = d2.sum()
        c = int(rng.choice(len(d2), p=d2 / total)) if total > 0 else int(rng.choice(np.setdiff1d(rows, chosen)))
        chosen.append(c)
        d2 = np.minimum(d2, dist2(c))
    return [Pick(i, f"uncertain and unlike earlier picks (gradient norm {np.sqrt(norm[i]):.3g}; predicted "
                    f"{classes[pred[i]]} at {p[i, pred[i]]:.2f})", float(np.sqrt(norm[i]))) for i in chosen]


def auto_choice(n_labeled: int, n_classes: int, budget: int, has_model: bool) -> str:
    """The rule ``auto`` applies this round: :data:`AUTO_COVERAGE` below the measured switch point,
    :data:`AUTO_UNCERTAINTY` above it."""
    if not has_model or n_classes < 2:
        return AUTO_COVERAGE
    return AUTO_UNCERTAINTY if (n_labeled + budget) / n_classes > AUTO_SWITCH_PER_CLASS else AUTO_COVERAGE


def select(strategy: str, pool: np.ndarray, budget: int, seed: int, labeled: np.ndarray | None = None,
           probs: Callable[[], tuple[np.ndarray, Sequence[str]]] | None = None, n_classes: int | None = None) -> list[Pick]:
    """``budget`` picks from ``pool`` by ``strategy`` (see the module docstring).

    Args:
        strategy: one of :data:`STRATEGIES`.
        pool: features [N, D] of the unlabeled images (a memmap is fine).
        budget: how many to pick, 1..N.
        seed: makes every random choice (k-means init, the random draw) repeatable.
        labeled: features [M, D] of the labeled images (None or empty for a cold start).
        probs: computes the pool's class probabilities and class names (a probe or a run); None when no model.
        n_classes: known class count (ProbCover's delta rule); defaults to 10 when unknown.
    """
    check_strategy(strategy)
    if not 1 <= budget <= len(pool):
        raise ConfigError(f"budget {budget} must be between 1 and the pool size {len(pool)}")
    labeled = np.zeros((0, pool.shape[1]), np.float32) if labeled is None else np.asarray(labeled, np.float32)
    if strategy == "auto":
        strategy = auto_choice(len(labeled), n_classes or 0, budget, probs is not None)
    if strategy == "random":
        return random_picks(len(pool), budget, seed)
    if strategy == "typiclust":
        return typiclust(pool, labeled, budget, seed)
    if strategy == "probcover":
        return probcover(pool, labeled, budget, seed, n_classes or 10)
    if probs is None:
        raise ConfigError(f"--strategy {strategy} needs a model to be uncertain about: pass --labeled DATA (a probe "
                          "is fitted on it) or --run RUN_DIR; with no labels at all use typiclust, probcover or auto")
    p, classes = probs()
    if strategy == "badge":
        return badge(pool, p, classes, budget, seed)
    return uncertainty(p, classes, budget, strategy)
