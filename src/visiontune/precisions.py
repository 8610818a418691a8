"""The precisions inference runs in, in one light module: the command line offers them as choices
without importing torch, and :mod:`visiontune.runtime` / :mod:`visiontune.multi` check against them."""

from __future__ import annotations

INFERENCE_PRECISIONS = ("run", "fp32", "bf16")
"""``predict`` / ``eval --precision``: the run's own ``optim.precision``, fp32, or bf16 autocast."""

HOST_PRECISIONS = ("fp32", "bf16")
"""What an adapter host computes in (``serve --precision``): fp32, or bf16 autocast for every task."""
