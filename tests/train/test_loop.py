"""Training loop behaviour on tiny models: run directory, methods' freezing, accumulation, resume, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import visiontune as vt
from visiontune.errors import ConfigError, TrainingPaused, TrainingStopped
from visiontune.data import load_records, make_splits
from visiontune.train import loop


def _train(overrides, *extra):
    return vt.train(vt.load_config(None, [*overrides, *extra]))


def test_run_directory_contents_and_eval_roundtrip(tiny_overrides):
    res = _train(tiny_overrides, "method.name=full", "run.name=a", "run.measure_speed=true")
    d = res.run_dir
    for f in ("config.yaml", "labels.json", "adapter.safetensors", "metrics.json", "report.md", "confusion.png",
              "history.png", "checkpoint/last.safetensors"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    assert m["run"]["classes"] == [str(i) for i in range(10)]
    assert m["run"]["train_size"] == 80 and m["run"]["test_size"] == 100
    assert 0.0 <= m["test"]["accuracy"] <= 1.0 and len(m["test"]["confusion"]) == 10
    assert m["params"]["trainable"] == m["params"]["total"] > 0
    assert m["speed"]["latency_ms"] > 0 and m["speed"]["throughput_img_s"] > 0
    assert m["train"]["epochs"] == 2 and m["train"]["peak_memory_mb"] > 0
    assert "accuracy" in (d / "report.md").read_text().lower()
    # Reloading the run reproduces the test metrics exactly.
    again = vt.evaluate(str(d))
    assert again["accuracy"] == pytest.approx(m["test"]["accuracy"])
    assert again["confusion"] == m["test"]["confusion"]


def test_linear_probe_freezes_backbone_and_saves_only_head(tiny_overrides):
    res = _train(tiny_overrides, "method.name=linear", "run.name=lin")
    state = load_file(str(res.run_dir / "adapter.safetensors"))
    assert sorted(state) == ["head.bias", "head.weight"]
    m = res.metrics
    assert m["train"]["feature_cache"] is True and m["train"]["c_selected_by"] == "cv"
    dim = vt.load(str(res.run_dir)).model.num_features
    assert m["params"]["trainable"] == 10 * dim + 10  # exactly the head
    assert not (res.run_dir / "checkpoint").exists()  # nothing to resume: features + one fit


def test_linear_views_cache_augmented_features(tiny_overrides):
    res = _train(tiny_overrides, "method.name=linear", "method.views=3", "run.name=lin3")
    assert res.metrics["train"]["cached_views"] == 3


def test_linear_adamw_solver_uses_epochs(tiny_overrides):
    res = _train(tiny_overrides, "method.name=linear", "method.solver=adamw", "optim.epochs=5", "run.name=linadam")
    assert len(res.metrics["train"]["history"]) == 5


def test_scratch_records_random_init(tiny_overrides):
    res = _train(tiny_overrides, "method.name=scratch", "backbone.weights=hub", "run.name=s")
    cfg = vt.load_config(res.run_dir / "config.yaml")
    assert cfg.backbone.weights == "none"
    assert cfg.optim.lr == 1e-3  # method default filled into the resolved config


def test_gradient_accumulation_matches_large_batch(tiny_overrides):
    common = ["method.name=full", "data.augment=false", "optim.epochs=1", "optim.label_smoothing=0", "optim.clip_grad=null",
              "optim.warmup_epochs=0", "optim.head_init=zero"]
    a = _train(tiny_overrides, *common, "optim.batch_size=16", "optim.grad_accum=1", "run.name=big")
    b = _train(tiny_overrides, *common, "optim.batch_size=8", "optim.grad_accum=2", "run.name=acc")
    sa = load_file(str(a.run_dir / "adapter.safetensors"))
    sb = load_file(str(b.run_dir / "adapter.safetensors"))
    diff = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert diff < 1e-5, diff


def test_deterministic_given_seed(tiny_overrides):
    a = _train(tiny_overrides, "method.name=full", "run.name=d1")
    b = _train(tiny_overrides, "method.name=full", "run.name=d2")
    assert a.metrics["train"]["history"] == b.metrics["train"]["history"]


def test_resume_after_interruption_matches_uninterrupted(tiny_overrides, monkeypatch):
    common = ["method.name=full", "optim.epochs=3"]
    ref = _train(tiny_overrides, *common, "run.name=ref")
    real = loop.train_one_epoch
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_overrides, *common, "run.name=crash")
    monkeypatch.setattr(loop, "train_one_epoch", real)
    res = _train(tiny_overrides, *common, "run.name=crash", "run.resume=true")
    assert [h["train_loss"] for h in res.metrics["train"]["history"]] == pytest.approx(
        [h["train_loss"] for h in ref.metrics["train"]["history"]], abs=1e-6
    )
    sa = load_file(str(ref.run_dir / "adapter.safetensors"))
    sb = load_file(str(res.run_dir / "adapter.safetensors"))
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-6


def test_best_epoch_selected_on_validation(tiny_overrides):
    res = _train(tiny_overrides, "method.name=full", "data.val_per_class=3", "optim.epochs=3", "run.name=v")
    t = res.metrics["train"]
    h = t["history"]
    assert all("val_accuracy" in r for r in h)
    # Epoch 0 (the probe-initialised head, before any fine-tuning) competes with the trained epochs.
    scores = {0: t["epoch0_val_accuracy"], **{r["epoch"]: r["val_accuracy"] for r in h}}
    best = t["best_epoch"]
    assert scores[best] == max(scores.values())
    assert res.metrics["val"]["accuracy"] == pytest.approx(scores[best])


def test_refuses_to_clobber_finished_run(tiny_overrides):
    _train(tiny_overrides, "method.name=linear", "run.name=same")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        _train(tiny_overrides, "method.name=linear", "run.name=same")
    _train(tiny_overrides, "method.name=linear", "run.name=same", "run.overwrite=true")


def test_nonfinite_loss_is_explained(tiny_overrides):
    with pytest.raises(FloatingPointError, match="lower optim.lr"):
        _train(tiny_overrides, "method.name=full", "optim.lr=1e30", "optim.head_lr=1e30", "optim.clip_grad=null",
               "optim.warmup_epochs=0", "optim.epochs=3", "run.name=nan")


def test_probe_head_init_starts_from_a_fitted_head(tiny_overrides):
    """LP-FT: gradient methods on pretrained weights start from a linear-probe head; scratch from zero."""
    res = _train(tiny_overrides, "method.name=full", "optim.epochs=1", "run.name=lpft")
    t = res.metrics["train"]
    assert t["head_init"] == "probe" and t["head_init_c"] > 0
    res = _train(tiny_overrides, "method.name=scratch", "optim.epochs=1", "run.name=scr")
    assert res.metrics["train"]["head_init"] == "zero"


def test_probe_head_init_views_fit_the_head_on_augmented_views_too(tiny_overrides):
    """optim.head_init_views=3: the LP-FT probe sees the clean view and two augmented views of each training image."""
    res = _train(tiny_overrides, "method.name=full", "optim.epochs=1", "optim.head_init_views=3", "run.name=v3")
    assert res.metrics["train"]["head_init_views"] == 3
    one = _train(tiny_overrides, "method.name=full", "optim.epochs=1", "run.name=v1")
    assert one.metrics["train"]["head_init_views"] == 1
    # Without augmentation every view would be the clean one: a single view is fitted.
    flat = _train(tiny_overrides, "method.name=full", "optim.epochs=1", "optim.head_init_views=3", "data.augment=false", "run.name=flat")
    assert flat.metrics["train"]["head_init_views"] == 1
    with pytest.raises(ConfigError, match="optim.head_init_views=0 must be >= 1"):
        vt.load_config(None, [*tiny_overrides, "optim.head_init_views=0"])


def test_view_features_are_the_clean_view_then_augmented_ones(tiny_overrides):
    from visiontune.backbones.transforms import build_transform
    from visiontune.registry import METHODS
    from visiontune.runs import build_model

    cfg = vt.load_config(None, [*tiny_overrides, "method.name=full"])
    records = load_records(cfg.data.dataset)
    splits = make_splits(records, cfg.data)
    model = build_model(cfg, METHODS.get("full")(cfg.method), len(records.classes)).eval()
    cpu = torch.device("cpu")
    eval_tf = build_transform(model, 32, train=False)
    train_tf = build_transform(model, 32, train=True, crop_scale=0.5)
    x, y, groups = loop._view_features(model, splits["train"], cfg, cpu, None, eval_tf, train_tf, 3)
    n = len(splits["train"])
    x1, y1, _ = loop._view_features(model, splits["train"], cfg, cpu, None, eval_tf, train_tf, 1)
    assert x.shape[0] == 3 * n and (groups == np.tile(np.arange(n), 3)).all() and (y == y1.repeat(3)).all()
    assert torch.allclose(x[:n], x1, atol=1e-5)  # view 0 is the clean view
    assert not torch.allclose(x[n : 2 * n], x1, atol=1e-3)  # the others are augmented


def test_fresh_head_is_zero_before_training():
    from visiontune.methods.base import classifier_of
    from visiontune.registry import METHODS
    from visiontune.runs import build_model

    cfg = vt.load_config(None, ["data.dataset=digits", "backbone.name=test_vit", "backbone.weights=none", "method.name=full"])
    model = build_model(cfg, METHODS.get("full")(cfg.method), 7)
    head = classifier_of(model)
    assert head.out_features == 7 and float(head.weight.detach().abs().sum()) == 0.0 and float(head.bias.detach().abs().sum()) == 0.0


def test_stop_hook_ends_training_between_steps_and_the_run_resumes(tiny_overrides):
    # ``train(stop=...)`` is how ``visiontune auto`` keeps its budget inside a fold: asked after every optimizer
    # step, True raises TrainingStopped; the last finished epoch's checkpoint stays, and a resume finishes the run
    # exactly as if it had never stopped.
    common = ["method.name=full", "optim.epochs=3", "optim.batch_size=16"]  # 80 images: 5 steps per epoch
    ref = _train(tiny_overrides, *common, "run.name=ref")
    run_dir = ref.run_dir.parent / "stopped"
    asked = {"n": 0}

    def stop() -> bool:
        asked["n"] += 1
        return asked["n"] == 7  # the second step of epoch 2

    with pytest.raises(TrainingStopped, match="stopped by the caller"):
        loop.train(vt.load_config(None, [*tiny_overrides, *common, "run.name=stopped"]), stop=stop)
    assert asked["n"] == 7  # asked once per optimizer step, and never again after the True
    assert (run_dir / "checkpoint").exists() and not (run_dir / "metrics.json").exists()
    res = _train(tiny_overrides, *common, "run.name=stopped", "run.resume=true")
    assert [h["train_loss"] for h in res.metrics["train"]["history"]] == pytest.approx(
        [h["train_loss"] for h in ref.metrics["train"]["history"]], abs=1e-6
    )


def test_pause_after_an_epoch_scores_the_checkpoint_and_the_run_resumes_to_the_uninterrupted_one(tiny_overrides):
    # ``train(pause_after=E)`` is how ``visiontune auto`` scores a candidate a third of the way into a fold: the
    # schedule is the whole run's, epoch E's checkpoint stays, score_checkpoint rebuilds that model, and a resume
    # finishes the run exactly as if it had never paused.
    common = ["method.name=lora", "method.targets=qv", "method.rank=4", "optim.epochs=3", "optim.batch_size=16"]
    ref = _train(tiny_overrides, *common, "run.name=ref")
    cfg = vt.load_config(None, [*tiny_overrides, *common, "run.name=paused"])
    with pytest.raises(TrainingPaused, match="after epoch 1 of 3") as stopped:
        loop.train(cfg, pause_after=1)
    run_dir = stopped.value.run_dir
    assert run_dir == ref.run_dir.parent / "paused"
    assert (run_dir / "checkpoint").exists() and not (run_dir / "metrics.json").exists()
    splits = make_splits(load_records(cfg.data.dataset), cfg.data)
    paused = loop.score_checkpoint(cfg, run_dir, splits["test"])
    assert paused["num_samples"] == len(splits["test"]) and 0.0 <= paused["accuracy"] <= 1.0
    res = _train(tiny_overrides, *common, "run.name=paused", "run.resume=true")
    assert [h["train_loss"] for h in res.metrics["train"]["history"]] == pytest.approx(
        [h["train_loss"] for h in ref.metrics["train"]["history"]], abs=1e-6
    )
    # The same rebuild from the finished run's last checkpoint is the model the run itself scored.
    final = loop.score_checkpoint(cfg, ref.run_dir, splits["test"])
    assert final["accuracy"] == pytest.approx(ref.metrics["test"]["accuracy"])
    assert final["confusion"] == ref.metrics["test"]["confusion"]
    assert paused["confusion"] != final["confusion"]  # two more epochs changed the model it scores


def test_run_threads_hold_for_the_run_only(tiny_overrides, monkeypatch):
    """run.threads sets torch's threads while the run trains; the caller's count is back afterwards (a run in a
    notebook or a test session must not leave the process on one thread)."""
    import torch

    seen = []
    real = loop.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _train(tiny_overrides, "method.name=lora", "optim.epochs=1", "run.threads=1", "run.name=thr")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
