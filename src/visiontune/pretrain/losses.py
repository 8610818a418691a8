"""DINOv2's self-distillation losses, the teacher centering, the teacher EMA and their schedules.

* DINO image-level loss (Caron et al., ICCV'21, https://arxiv.org/abs/2104.14294): cross-entropy
  between the teacher's centered, sharpened softmax over K prototypes of one view and the student's
  softmax of another view, averaged over every (student view, teacher view) pair of different views.
* iBOT masked-patch loss (Zhou et al., ICLR'22, https://arxiv.org/abs/2111.07832): the same
  cross-entropy per masked patch of a global crop (student sees the mask token, teacher the patch),
  averaged over the masked patches of an image, then over images.
* KoLeo regulariser (Sablayrolles et al., ICLR'19, https://arxiv.org/abs/1806.03198), used by
  DINOv2 (Oquab et al., 2023, https://arxiv.org/abs/2304.07193): ``-mean log(distance to the
  nearest neighbour)`` of L2-normalised student class tokens in a batch; it spreads them apart.
* Teacher centering: subtract an EMA of the teacher's mean output before the softmax (prevents one
  prototype from dominating), or Sinkhorn-Knopp equipartition (DINOv2's option for large models).

Written here, following the papers and reading the DINOv2 code for the conventions (which pairs
count, how the iBOT average is weighted), because the only maintained library with these losses
(``lightly``) brings pytorch-lightning, hydra-core and an API client as dependencies for ~150 lines
of tensor code, and exposes them per loss rather than with the shared teacher state DINOv2 uses.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import visiontune.distributed as distributed


def pairwise_dino_loss(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temp: float,
    skip_same_view: bool = True,
) -> tuple[torch.Tensor, int]:
    """Sum over (student view, teacher view) pairs of the batch-mean cross-entropy ``-sum_k t_k log s_k``.

    Args:
        student_logits: one ``[B, K]`` tensor per student view. The first ``len(teacher_probs)`` views
            must be the global crops, in the teacher's order, when ``skip_same_view`` is set.
        teacher_probs: one ``[B, K]`` tensor per teacher view (already centered and sharpened).
        student_temp: student softmax temperature.
        skip_same_view: leave out the pairs where student and teacher saw the same global crop.

    Returns:
        (sum of the per-pair losses, number of pairs). Divide the first by the second for the average.
    """
    total = student_logits[0].new_zeros(())
    pairs = 0
    for i, s in enumerate(student_logits):
        log_s = F.log_softmax(s.float() / student_temp, dim=-1)
        for j, t in enumerate(teacher_probs):
            if skip_same_view and i == j:
                continue
            total = total - (t * log_s).sum(dim=-1).mean()
            pairs += 1
    return total, pairs


def ibot_patch_loss(
    student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, image_index: torch.Tensor, n_images: int,
    student_temp: float,
) -> torch.Tensor:
    """iBOT loss over masked patches: mean over each image's masked patches, then mean over all images.

    Images without masked patches count in the average with zero loss, as in DINOv2 (so the loss
    scale does not jump with the number of masked images in a batch).

    Args:
        student_patch_logits: ``[M, K]`` student head outputs at the M masked positions.
        teacher_patch_probs: ``[M, K]`` teacher probabilities at the same positions.
        image_index: ``[M]`` which image (0..n_images-1) each masked patch belongs to.
        n_images: images in the batch (masked or not).
        student_temp: student softmax temperature.
    """
    if student_patch_logits.numel() == 0:
        return student_patch_logits.sum() * 0.0
    ce = -(teacher_patch_probs * F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    counts = torch.bincount(image_index, minlength=n_images).clamp(min=1).to(ce.dtype)
    return (ce / counts[image_index]).sum() / n_images


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator term: ``-mean_i log ||x_i - x_nn(i)||`` on L2-normalised rows.

    Args:
        x: ``[B, D]`` features (B >= 2), e.g. the student's class tokens of one global view.
        eps: keeps the log finite for duplicate rows.
    """
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 rows to find a nearest neighbour, got {x.shape[0]}")
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        # On the unit sphere the nearest neighbour is the largest dot product; exclude the row itself.
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nn_index = dots.argmax(dim=1)
    dist = (x - x[nn_index]).norm(dim=-1)
    return -torch.log(dist + eps).mean()


class TeacherCentering(nn.Module):
    """The teacher's output transform: EMA centering + sharpening, or Sinkhorn-Knopp.

    The center is a buffer so it is saved in checkpoints and moves with ``.to(device)``. Under a launcher
    each process passes its share of the batch: the center's update and Sinkhorn's normalisations sum
    over every process (:func:`visiontune.distributed.all_reduce`, as DINOv2 does), so the probabilities
    are the one-process batch's.

    Args:
        dim: output size K.
        momentum: EMA momentum of the center (DINO: 0.9).
        mode: ``center`` or ``sinkhorn``.
    """

    def __init__(self, dim: int, momentum: float = 0.9, mode: str = "center"):
        super().__init__()
        if mode not in ("center", "sinkhorn"):
            raise ValueError(f"centering mode {mode!r} is not 'center' or 'sinkhorn'")
        self.momentum = momentum
        self.mode = mode
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Probabilities ``[N, K]`` for ``[N, K]`` teacher logits; updates the center afterwards (center mode).

        The probabilities use the center *before* this batch's update, as DINO does. Every process must call
        it, even with no rows (N = 0), as long as the batch over all processes has some.
        """
        t = teacher_logits.float()
        if self.mode == "sinkhorn":
            return sinkhorn_knopp(t, temp)
        probs = F.softmax((t - self.center) / temp, dim=-1)
        total = distributed.all_reduce(torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])]))
        self.center.mul_(self.momentum).add_(total[None, :-1] / total[-1], alpha=1.0 - self.momentum)
        return probs


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Soft assignments ``[N, K]`` with (approximately) equal total mass per prototype; rows sum to 1.

    Alternates normalising prototypes (each gets 1/K of the mass) and samples (each 1/N), starting
    from ``exp(logits / temp)``; the last step normalises samples, so rows sum to exactly 1. Under a
    launcher ``logits`` is this process's share of the samples and the sums over samples run over all.
    """
    logits = logits.float()
    top = logits.max() if logits.numel() else logits.new_tensor(-math.inf)
    # The shift only rescales, but it must be the same on every process.
    q = torch.exp((logits - distributed.all_reduce(top, "max")) / temp).t()  # [K, N]
    k = q.shape[0]
    n = float(distributed.all_reduce(q.new_tensor(float(q.shape[1]))))
    q /= distributed.all_reduce(q.sum())
    for _ in range(iterations):
        q /= distributed.all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, in place, pairwise."""
    t_list, s_list = list(teacher), list(student)
    if len(t_list) != len(s_list):
        raise ValueError(f"EMA over {len(t_list)} teacher and {len(s_list)} student tensors; they must pair up")
    for t, s in zip(t_list, s_list):
        t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)


def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (last step): DINO's teacher-momentum schedule."""
    if total <= 1:
        return end
    progress = min(1.0, step / (total - 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warmup of the teacher temperature from ``start`` to ``end`` over ``warmup_steps``, then ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
