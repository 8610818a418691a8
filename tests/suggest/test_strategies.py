"""The selection rules on feature arrays: what each picks on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.errors import ConfigError
from visiontune.suggest import strategies as st


def blobs(n_per: int = 40, k: int = 4, dim: int = 8, seed: int = 0, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:k] * 5
    x = np.concatenate([c + rng.normal(0, spread, (n_per, dim)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_typiclust_cold_start_takes_one_central_image_per_cluster() -> None:
    x, y = blobs()
    picks = st.typiclust(x, np.zeros((0, x.shape[1])), 4, seed=0)
    assert sorted(y[[p.index for p in picks]].tolist()) == [0, 1, 2, 3]
    for p in picks:  # the most typical member is near its blob's centre
        members = x[y == y[p.index]]
        assert np.linalg.norm(x[p.index] - members.mean(0)) < np.median(np.linalg.norm(members - members.mean(0), axis=1))
    assert all(p.reason.startswith("most typical image of cluster") for p in picks)


def test_typiclust_skips_clusters_the_labeled_images_cover() -> None:
    x, y = blobs()
    labeled = np.concatenate([x[y == 0][:1], x[y == 1][:1]])  # blobs 0 and 1 already labeled
    picks = st.typiclust(x, labeled, 2, seed=0)
    assert sorted(y[[p.index for p in picks]].tolist()) == [2, 3]


def test_probcover_covers_every_blob_first() -> None:
    x, y = blobs()
    picks = st.probcover(x, np.zeros((0, x.shape[1])), 4, seed=0, n_classes=4)
    assert sorted(y[[p.index for p in picks]].tolist()) == [0, 1, 2, 3]
    assert len({p.index for p in picks}) == 4


def test_margin_and_entropy_pick_the_uncertain_rows_with_the_two_classes_named() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.45, 0.40, 0.15], [0.34, 0.33, 0.33], [0.6, 0.1, 0.3]])
    m = st.uncertainty(probs, ["A", "B", "C"], 2, "margin")
    assert [p.index for p in m] == [2, 1]
    assert m[1].reason == "margin 0.050 between A and B"
    e = st.uncertainty(probs, ["A", "B", "C"], 1, "entropy")
    assert e[0].index == 2


def test_random_is_repeatable_for_a_seed_and_changes_with_it() -> None:
    a = [p.index for p in st.random_picks(100, 10, 3)]
    assert a == [p.index for p in st.random_picks(100, 10, 3)]
    assert a != [p.index for p in st.random_picks(100, 10, 4)]
    assert len(set(a)) == 10


def test_select_is_deterministic_for_every_strategy() -> None:
    x, y = blobs(seed=1)
    lab = x[::37]

    def probs():
        return np.random.default_rng(0).dirichlet(np.ones(4), len(x)), ["a", "b", "c", "d"]

    for name in st.STRATEGIES:
        one = [p.index for p in st.select(name, x, 6, 7, labeled=lab, probs=probs, n_classes=4)]
        two = [p.index for p in st.select(name, x, 6, 7, labeled=lab, probs=probs, n_classes=4)]
        assert one == two and len(set(one)) == 6, name


def test_auto_switches_at_the_measured_point() -> None:
    n = st.AUTO_SWITCH_PER_CLASS
    assert st.auto_choice(0, 0, 10, has_model=False) == st.AUTO_COVERAGE
    assert st.auto_choice(int(n * 5) - 5, 5, 5, has_model=True) == st.AUTO_COVERAGE  # exactly n per class after
    assert st.auto_choice(int(n * 5), 5, 5, has_model=True) == st.AUTO_UNCERTAINTY


def test_bad_input_is_named() -> None:
    x, _ = blobs()
    with pytest.raises(ConfigError, match="unknown strategy 'best'"):
        st.select("best", x, 3, 0)
    with pytest.raises(ConfigError, match="between 1 and the pool size 160"):
        st.select("random", x, 161, 0)
    with pytest.raises(ConfigError, match="needs a model"):
        st.select("margin", x, 3, 0)


def test_probcover_ties_do_not_fall_to_the_first_files(monkeypatch) -> None:
    """With a radius under every neighbour distance each ball covers only its centre: all gains tie. Ties went to the
    lowest index, i.e. the first files of the sorted folder, one class; they now go to a seeded random point."""
    x, y = blobs(spread=0.5)
    monkeypatch.setattr(st, "DELTAS", np.array([0.001]))
    picks = st.probcover(x, np.zeros((0, x.shape[1])), 8, seed=0, n_classes=4)
    assert len(set(y[[p.index for p in picks]].tolist())) > 1
    assert [p.index for p in picks] == [p.index for p in st.probcover(x, np.zeros((0, 8)), 8, seed=0, n_classes=4)]


def test_badge_starts_at_the_largest_gradient_and_spreads_over_the_blobs() -> None:
    x, y = blobs(n_per=30, k=4)
    probs = np.full((len(x), 4), 0.25)  # equally unsure everywhere: diversity decides
    probs[7] = [0.1, 0.1, 0.1, 0.7]  # one confident image: the smallest gradient, not a first pick
    flat = st.badge(x, probs, ["a", "b", "c", "d"], 4, seed=0)
    assert sorted(y[[p.index for p in flat]].tolist()) == [0, 1, 2, 3]  # one per blob, none twice from a blob
    assert flat[0].score == max(p.score for p in flat)
    assert all(p.reason.startswith("uncertain and unlike earlier picks") for p in flat)
