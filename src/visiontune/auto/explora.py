"""Stage 2b of ``visiontune auto`` (with ``--unlabeled DIR``): ExPLoRA extended pretraining
(:mod:`visiontune.pretrain`) continues the chosen backbone's self-supervised training on those images (the labeled
data's test split left out) when the budget allows it; the new backbone's probe and prototype are scored on the
same folds, and it replaces the original only when its paired gain over the original's best cheap candidate is
more than one standard error (it costs more).
"""

from __future__ import annotations

import time
from typing import Any

from visiontune.auto.cheap import Features, cheap_stage, fold_mean
from visiontune.auto.plan import CHEAP, EXPLORA_SUFFIX, Task
from visiontune.auto.record import Record
from visiontune.auto.settings import EXPLORA_BUDGET_SHARE, AutoSettings
from visiontune.auto.stats import paired_folds
from visiontune.pretrain import load_pretrain_config, pretrain


class _PretrainOverBudget(Exception):
    """Raised from the pretraining callback when the projected time no longer fits the budget."""


def explora_stage(task: Task, record: Record, settings: AutoSettings, features: Features, base: str) -> str:
    """Pretrain ``base`` on the unlabeled images, score its cheap candidates, return the backbone to escalate on."""
    key = base + EXPLORA_SUFFIX
    rec = record.state.setdefault("explora", {"base": base, "status": "running"})
    if rec["status"] == "running":
        rec.update(_pretrain(task, record, settings, base))
        record.save()
    if rec["status"] != "complete":
        return base
    task.variants[key] = list(rec["overrides"])
    cheap_stage(task, record, features, [key])
    # Same rule as the decision: the dearer backbone must beat the cheaper one beyond the paired interval.
    ours = record.state["cheap"][key]["candidates"]
    theirs = record.state["cheap"][base]["candidates"]
    a = max(ours.values(), key=fold_mean)
    b = max(theirs.values(), key=fold_mean)
    gain = paired_folds([f["accuracy"] for f in a["folds"]], [f["accuracy"] for f in b["folds"]], task.k)
    rec["gain_vs_base"] = {"mean": gain.mean, "se": gain.se, "low": gain.low, "high": gain.high}
    rec["chosen"] = gain.beyond_one_se()
    record.save()
    record.log(
        f"ExPLoRA backbone: best cheap {fold_mean(a):.3f} vs {fold_mean(b):.3f} ({100 * gain.mean:+.1f} points, standard "
        f"error {100 * gain.se:.1f}) -> {'escalating on it' if rec['chosen'] else 'kept the original'}"
    )
    return key if rec["chosen"] else base


def _pretrain(task: Task, record: Record, settings: AutoSettings, base: str) -> dict[str, Any]:
    """One ExPLoRA run on ``settings.unlabeled`` (the labeled data's test split left out); stopped by the budget."""
    cfg = task.config(base, CHEAP[0].overrides)
    out = record.out
    run_dir = out / "explora"
    labeled = task.cfg.dump(out / "labeled-data.yaml")  # its val/test images stay out of pretraining
    resume = (run_dir / "checkpoint").is_dir()
    steps = settings.unlabeled_steps
    pcfg = load_pretrain_config(None, overrides=[
        f"data.dataset={settings.unlabeled}", f"data.exclude_eval_of={labeled}",
        f"backbone.name={cfg.backbone.name}", f"backbone.weights={cfg.backbone.weights}",
        *([f"backbone.img_size={cfg.backbone.img_size}"] if cfg.backbone.img_size else []),
        # CPU-sized defaults that hold across datasets of a few thousand images (DINOv2's 65,536 prototypes
        # and 8 local crops are sized for 142M images).
        "ssl.prototypes=4096", "crops.local_number=4", "optim.batch_size=16", f"optim.steps={steps}",
        f"run.dir={out}", "run.name=explora", f"run.progress={str(record.progress).lower()}",
        f"run.seed={task.cfg.run.seed}", "run.resume=true" if resume else "run.overwrite=true",
    ])
    started = record.elapsed()
    allowed = None if settings.budget_s is None else EXPLORA_BUDGET_SHARE * max(settings.budget_s - started, 0.0)
    t0 = time.perf_counter()
    first = {"step": None}

    def over_budget(step: int, row: dict[str, Any]) -> None:
        if first["step"] is None:
            first["step"], first["t"] = step, time.perf_counter()
            return
        if allowed is None or step == first["step"]:
            return
        per_step = (time.perf_counter() - first["t"]) / (step - first["step"])
        if time.perf_counter() - t0 + per_step * (steps - step) > allowed:
            raise _PretrainOverBudget(f"{step} of {steps} steps at {per_step:.1f} s/step")

    if allowed is not None and allowed <= 0:
        record.log("ExPLoRA: no budget left for pretraining")
        return {"status": "budget", "why": "no budget left"}
    record.log(f"ExPLoRA: pretraining {base} on {settings.unlabeled} ({steps} steps)")
    try:
        result = pretrain(pcfg, callback=over_budget)
    except _PretrainOverBudget as e:
        record.log(f"ExPLoRA: stopped by the budget ({e}); the original backbone is kept")
        return {"status": "budget", "why": str(e), "pretrain_s": time.perf_counter() - t0}
    return {
        "status": "complete", "overrides": result.overrides(), "backbone": str(result.backbone),
        "pretrain_s": time.perf_counter() - t0, "images": result.lineage.get("data", {}).get("images"),
        "held_out": result.lineage.get("data", {}).get("held_out"),
    }


__all__ = ["explora_stage"]
