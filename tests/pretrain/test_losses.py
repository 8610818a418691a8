"""DINOv2 losses on fixed tensors: centering + sharpening, DINO pairs, iBOT masking, KoLeo, Sinkhorn, EMA, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visiontune.pretrain.losses import (
    TeacherCentering, cosine_schedule, ema_update, ibot_patch_loss, koleo_loss, pairwise_dino_loss, sinkhorn_knopp,
    teacher_temperature,
)
from visiontune.pretrain.masking import block_mask, sample_masks


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_centering_and_sharpening_on_fixed_logits():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    c = TeacherCentering(3, momentum=0.9)
    p1 = c(logits, temp=0.5)
    # Center starts at zero: plain sharpened softmax, computed independently in numpy.
    np.testing.assert_allclose(p1.numpy(), _softmax(logits.numpy() / 0.5), rtol=1e-6)
    # Then the center moves 10% of the way to the batch mean [1, 0.5, 2].
    np.testing.assert_allclose(c.center.numpy(), [[0.1, 0.05, 0.2]], rtol=1e-6)
    p2 = c(logits, temp=0.5)
    np.testing.assert_allclose(p2.numpy(), _softmax((logits.numpy() - [[0.1, 0.05, 0.2]]) / 0.5), rtol=1e-6)
    np.testing.assert_allclose(c.center.numpy(), 0.9 * np.array([[0.1, 0.05, 0.2]]) + 0.1 * np.array([[1.0, 0.5, 2.0]]), rtol=1e-6)
    # Sharpening: a lower temperature keeps the argmax and lowers the entropy.
    cold, warm = TeacherCentering(3)(logits, 0.04), TeacherCentering(3)(logits, 1.0)
    assert torch.equal(cold.argmax(1), warm.argmax(1))
    ent = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())  # noqa: E731
    assert ent(cold) < ent(warm)
    # Centering removes a prototype that dominates every sample: after enough updates it no longer wins everywhere.
    dominated = torch.tensor([[5.0, 0.0, 0.5], [5.0, 0.6, 0.0]])
    c = TeacherCentering(3, momentum=0.0)  # center = last batch mean
    c(dominated, 0.1)
    assert set(c(dominated, 0.1).argmax(1).tolist()) == {1, 2}


def test_dino_loss_pairs_and_value():
    s = [torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.0]])]  # g1, g2, local
    t = [torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.1, 0.8]])]
    total, pairs = pairwise_dino_loss(s, t, student_temp=0.1)
    assert pairs == 4  # g1-t2, g2-t1, local-t1, local-t2 (never a crop against itself)
    ce = lambda sv, tv: float(-(tv.numpy() * np.log(_softmax(sv.numpy() / 0.1))).sum())  # noqa: E731
    expected = ce(s[0], t[1]) + ce(s[1], t[0]) + ce(s[2], t[0]) + ce(s[2], t[1])
    assert float(total) == pytest.approx(expected, rel=1e-5)
    total_all, pairs_all = pairwise_dino_loss(s, t, 0.1, skip_same_view=False)
    assert pairs_all == 6 and float(total_all) == pytest.approx(expected + ce(s[0], t[0]) + ce(s[1], t[1]), rel=1e-5)
    # Minimised when the student reproduces the teacher: a student equal to the teacher's log-probs beats a flipped one.
    tp = torch.tensor([[0.8, 0.1, 0.1]])
    good, _ = pairwise_dino_loss([tp.log() * 0.1], [tp], 0.1, skip_same_view=False)
    bad, _ = pairwise_dino_loss([tp.flip(1).log() * 0.1], [tp], 0.1, skip_same_view=False)
    assert float(good) < float(bad)


def test_ibot_loss_averages_per_image_over_masked_patches():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # three masked patches
    t = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    image = torch.tensor([0, 0, 1])  # image 0 has two masked patches, image 1 one, image 2 none
    ce = -(t * torch.log_softmax(s / 0.1, dim=-1)).sum(1)
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 3
    assert float(ibot_patch_loss(s, t, image, n_images=3, student_temp=0.1)) == pytest.approx(float(expected), rel=1e-6)
    empty = ibot_patch_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 4, 0.1)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_block_masks_and_batch_sampling():
    rng = np.random.default_rng(0)
    m = block_mask(8, 8, 20, rng)
    assert m.dtype == bool and 4 <= m.sum() <= 20  # never more than asked, made of rectangles of >= 4 patches
    assert block_mask(4, 4, 16, np.random.default_rng(1)).sum() <= 16
    masks = sample_masks(10, (8, 8), probability=0.5, ratio=(0.1, 0.5), rng=np.random.default_rng(3))
    assert masks.shape == (10, 8, 8) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    assert int((counts > 0).sum()) == 5  # int(10 * 0.5) crops are masked, the rest not at all
    assert int(counts.max()) <= int(0.5 * 64)
    again = sample_masks(10, (8, 8), 0.5, (0.1, 0.5), np.random.default_rng(3))
    assert torch.equal(masks, again)  # seeded: a resumed run draws the same masks
    assert not sample_masks(4, (8, 8), 0.0, (0.1, 0.5), np.random.default_rng(0)).any()


def test_koleo_on_fixed_points_and_its_gradient_spreads_them():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert float(koleo_loss(square)) == pytest.approx(-math.log(math.sqrt(2.0)), rel=1e-6)
    assert float(koleo_loss(3.0 * square)) == pytest.approx(float(koleo_loss(square)), rel=1e-6)  # scale-free
    pts = torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.0, 1.0], [-1.0, 0.2]], requires_grad=True)
    before = float(koleo_loss(pts).detach())
    koleo_loss(pts).backward()
    with torch.no_grad():
        moved = pts - 0.05 * pts.grad
    assert float(koleo_loss(moved)) < before  # descending KoLeo pushes the two close points apart
    with pytest.raises(ValueError):
        koleo_loss(torch.ones(1, 3))


def test_sinkhorn_equipartition():
    logits = torch.tensor([[3.0, 0.0, 0.0], [2.5, 0.1, 0.0], [3.0, 0.0, 0.2], [2.0, 0.0, 0.1]])
    q = sinkhorn_knopp(logits, temp=1.0, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(4))
    torch.testing.assert_close(q.sum(0), torch.full((3,), 4 / 3), atol=1e-3, rtol=0)
    assert int(TeacherCentering(3, mode="sinkhorn")(logits, 1.0).argmax(1).unique().numel()) > 1


def test_ema_update_and_schedules():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    s = [torch.tensor([3.0, 0.0]), torch.tensor([[10.0]])]
    ema_update(t, s, 0.9)
    torch.testing.assert_close(t[0], torch.tensor([1.2, 1.8]))
    torch.testing.assert_close(t[1], torch.tensor([[1.0]]))
    ema_update(t, s, 1.0)
    torch.testing.assert_close(t[0], torch.tensor([1.2, 1.8]))  # momentum 1: frozen
    ema_update(t, s, 0.0)
    torch.testing.assert_close(t[0], s[0])  # momentum 0: copy
    with pytest.raises(ValueError):
        ema_update(t, s[:1], 0.5)
    assert cosine_schedule(0.992, 1.0, 0, 100) == pytest.approx(0.992)
    assert cosine_schedule(0.992, 1.0, 99, 100) == pytest.approx(1.0)
    assert cosine_schedule(0.992, 1.0, 50, 101) == pytest.approx(0.996)
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == teacher_temperature(99, 0, 0.04, 0.07) == 0.07
