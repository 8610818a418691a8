"""The anytime budget of ``visiontune auto`` (issue 28, part 4), on a clock that counts optimizer steps: one step is
one second, so the test asserts the decisions (order, start, stop, evidence, time used), never the machine's speed."""

from __future__ import annotations

from pathlib import Path

import pytest

import visiontune.auto.executor as executor
from visiontune.auto import PROBE, AutoSelect, AutoSettings, Candidate
from visiontune.auto.schedule import FlatPrior, PriorGain, StepTimes, by_priority, used_text
from visiontune.train import loop as train_loop

TINY = ["backbone.name=test_vit", "backbone.weights=none", "data.train_per_class=4", "data.test_per_class=3", "optim.epochs=2"]
# 20 training images per fold at batch 16: 2 steps an epoch; 12 steps: 6 epochs a fold, the first rung after epoch 2
A = Candidate("lora q,v r4", ("method.name=lora", "method.targets=qv", "method.rank=4"), cost=1.0)
B = Candidate("lora q,v r2 last block", ("method.name=lora", "method.targets=qv", "method.rank=2", "method.blocks=last:1"),
              cost=0.5)
C = Candidate("full fine-tuning", ("method.name=full",), cost=2.0)


@pytest.fixture
def steps_clock(monkeypatch: pytest.MonkeyPatch):
    """A clock that reads the optimizer steps taken so far (nothing else moves it), and the fold jobs started:
    (candidate run name, pause epoch, deadline, clock at the start)."""
    ticks = [0]
    real_step = train_loop.optimizer_step

    def counting(*args, **kwargs):
        ticks[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "optimizer_step", counting)
    jobs: list[tuple[str, int | None, float | None, float]] = []
    real_fold = executor.run_fold

    def spy(overrides, splits, deadline, cwd=None, pause_after=None, clock=None, head_features=None):
        name = next(o for o in overrides if o.startswith("run.name=")).removeprefix("run.name=")
        jobs.append((name, pause_after, deadline, clock()))
        return real_fold(overrides, splits, deadline, cwd, pause_after, clock, head_features)

    monkeypatch.setattr(executor, "run_fold", spy)
    return (lambda: float(ticks[0])), jobs


def _select(out: Path, clock, budget: float, prune: bool = True, **kw) -> AutoSelect:
    kw.setdefault("prior", FlatPrior())  # the order these tests assert is the flat prior's, whatever prior ships
    settings = AutoSettings(progress=False, folds=2, steps=12, budget_s=budget, candidates=(A, B, C), prune=prune)
    return AutoSelect("digits", out, settings, overrides=TINY, clock=clock, **kw)


def test_cheapest_first_each_started_while_an_epoch_fits_and_estimates_follow_measured_steps(tmp_path, steps_clock) -> None:
    clock, jobs = steps_clock
    sel = _select(tmp_path, clock, 10)
    record = sel.run()
    state = sel.record.state["finetune"]
    # Flat prior: the cheapest step first (B, then A), each a first rung of 4 steps (2 epochs)
    assert [(n, p) for n, p, _, _ in jobs[:2]] == [("lora-q-v-r2-last-block-fold1", 2), ("lora-q-v-r4-fold1", 2)]
    assert state[B.name]["steps"] == 4 and state[A.name]["steps"] == 4
    times = sel.finetune.step_times()
    assert times.step_s(B) == 1.0 and times.step_s(A) == 1.0  # measured: one tick a step
    # C was not measured: its cost (2) times the measured scale (median of 1/0.5 and 1/1) = 3 s a step, 6 an epoch,
    # and 2 s were left at t=8: not started, and the leaderboard says why
    assert times.step_s(C) == 3.0
    assert all(not n.startswith("full") for n, *_ in jobs)
    assert state[C.name]["status"] == "budget" and "2 s of the budget left" in state[C.name]["why"]
    assert "one epoch needs about 6 s" in state[C.name]["why"]
    went_on = [n for n in (A.name, B.name) if state[n]["rung"].get("promoted")]
    if went_on:  # the promoted one continued fold 1 with what was left, and the budget stopped it between steps
        assert jobs[2][0].endswith("-fold1") and jobs[2][1] is None and jobs[2][2:] == (10.0, 8.0)
        assert state[went_on[0]]["status"] == "budget" and state[went_on[0]]["partial"]["epoch"] == 2
    else:
        assert len(jobs) == 2
    assert record["elapsed_s"] <= 10.0 and record["used"] == used_text(record["elapsed_s"], 10.0)
    assert record["decision"]["candidate"] == PROBE  # no fine-tune finished its folds
    md = (tmp_path / "leaderboard.md").read_text()
    assert f"Used {record['elapsed_s'] / 60:.1f} of 0.2 minutes" in md and "not started on fold 1" in md


def test_the_budget_stops_a_fold_between_steps_and_its_checkpoint_is_the_evidence(tmp_path, steps_clock) -> None:
    # Nothing measured yet, so the first rung starts (any of it may fit); the budget of 3 steps ends it after step 3,
    # inside epoch 2: epoch 1's checkpoint is scored on fold 1's held-out part and stands as its first-rung score.
    clock, jobs = steps_clock
    sel = _select(tmp_path, clock, 3)
    record = sel.run()
    state = sel.record.state["finetune"]
    assert [(n, p, d) for n, p, d, _ in jobs] == [("lora-q-v-r2-last-block-fold1", 2, 3.0)]
    rec = state[B.name]
    assert rec["status"] == "budget" and rec["steps"] == 3
    assert rec["rung"]["stopped"] and rec["rung"]["epoch"] == 1 and rec["partial"]["epoch"] == 1
    assert 0.0 <= rec["rung"]["accuracy"] <= 1.0 and [p["epoch"] for p in rec["curves"]["1"]["curve"]] == [1]
    assert all(state[c.name]["status"] == "budget" and "not started" in state[c.name]["why"] for c in (A, C))
    assert record["elapsed_s"] == 3.0
    rows = {r["candidate"]: r for r in record["leaderboard"]}
    assert rows[B.name]["first_rung"]["epoch"] == 1 and rows[B.name]["partial"]["fold"] == 1



def test_a_fold_stops_before_the_step_that_would_cross_its_deadline(tmp_path, steps_clock) -> None:
    # 3.5 s: after step 3 the next step (1 s, the median gap so far) would end at 4 > 3.5, so the fold stops there
    # instead of overrunning the budget by a step (a minute a step on a loaded CPU made a 15-minute run 10.7 % over).
    clock, jobs = steps_clock
    sel = _select(tmp_path, clock, 3.5)
    record = sel.run()
    assert [(n, d) for n, _, d, _ in jobs] == [("lora-q-v-r2-last-block-fold1", 3.5)]
    assert sel.record.state["finetune"][B.name]["steps"] == 3 and record["elapsed_s"] == 3.0


def test_the_next_step_is_expected_to_take_the_median_gap() -> None:
    from visiontune.auto.executor import next_step_s

    assert next_step_s([]) == 0.0 and next_step_s([5.0]) == 0.0
    assert next_step_s([0.0, 1.0, 2.0, 9.0, 10.0]) == 1.0  # an epoch's end (7 s of validation) is not a step

class _Prefers(FlatPrior):
    """A prior that expects ten times the gain from one candidate (flat in the decision)."""

    def __init__(self, name: str):
        self.name = name

    def expected_gain(self, candidate: Candidate, features: dict) -> float:
        assert {"pool", "classes", "shots_per_class", "probe_cv_accuracy", "family"} <= set(features)
        return 10.0 if candidate.name == self.name else 1.0


def test_a_prior_orders_the_candidates_by_expected_gain_per_second(tmp_path, steps_clock) -> None:
    clock, jobs = steps_clock
    sel = _select(tmp_path, clock, 8, prior=_Prefers(C.name))
    record = sel.run()
    # C: 10 / 2 beats B: 1 / 0.5; then B (its estimate scaled by C's measured steps) before A
    assert [n for n, *_ in jobs] == ["full-fine-tuning-fold1", "lora-q-v-r2-last-block-fold1"]
    assert jobs[1][2:] == (8.0, 4.0)  # B starts at t=4 with 4 s left: stopped after its 4th step, before epoch 2 ended
    assert sel.record.state["finetune"][B.name]["rung"]["epoch"] == 1 and record["elapsed_s"] == 8.0


def test_step_times_scale_unmeasured_candidates_by_the_measured_ones() -> None:
    times = StepTimes({A: (4, 8.0)}, base_step_s=0.1)
    assert times.step_s(A) == 2.0 and times.step_s(B) == 1.0 and times.step_s(C) == 4.0
    assert StepTimes({}, base_step_s=0.1).step_s(C) == pytest.approx(0.2)  # before any: the plan's forward pass
    order = by_priority([A, C, B], FlatPrior(), {}, StepTimes({}, 0.0))
    assert order == [B, A, C]  # nothing measured, a clock at zero: relative cost decides


def test_a_candidate_the_budget_stopped_after_two_folds_is_judged_on_them() -> None:
    from visiontune.auto.leaderboard import MIN_PAIRED_FOLDS, is_eligible

    fold = {"accuracy": 0.7}
    assert is_eligible({"status": "complete", "folds": [fold] * 5})
    # Stopped three folds into five (the Fashion-MNIST 10/class selection's LoRA on the last blocks): it is decided on
    # its finished folds, paired with the probe's same folds, instead of counting for nothing.
    assert is_eligible({"status": "partial (budget)", "folds": [fold] * 3})
    assert is_eligible({"status": "partial (budget)", "folds": [fold] * MIN_PAIRED_FOLDS})
    assert not is_eligible({"status": "partial (budget)", "folds": [fold]})  # one fold: no spread to read
    assert is_eligible({"status": "pruned", "folds": [fold] * 3})  # pruned after fold 3: weighed on its 3 folds
    assert not is_eligible({"status": "pruned", "folds": [fold]})  # pruned after fold 1: one fold, no spread
    assert not is_eligible({"status": "budget", "folds": []})


class _Learned(FlatPrior):
    """A learned prior for one candidate only (+5 ± 3 points over the probe); flat for the others."""

    def __init__(self, name: str, mean: float = 0.05):
        self.name, self.mean = name, mean

    def expected_gain(self, candidate: Candidate, features: dict) -> float:
        return 10.0 if candidate.name == self.name else 1.0

    def gain(self, candidate: Candidate, features: dict) -> PriorGain:
        return PriorGain(self.mean, 0.03, "test") if candidate.name == self.name else PriorGain()


def test_a_candidate_the_budget_left_unfolded_is_chosen_on_its_prior_and_its_retrain_was_kept_in_reserve(
        tmp_path, steps_clock, monkeypatch) -> None:
    # 24 s. The prior alone would ship A, so its final retrain (40 images: 3 steps an epoch, 4 epochs = 12 steps,
    # times the 1.3 margin: 15.6 s) is held back from the start: A's fold 1 may use 8.4 s and is stopped after its 8th
    # step, B and C cannot start. Without a learned prior that left A unjudged and shipped the probe (a busy machine's
    # fate: the Fashion-MNIST 10/class selection); with one, A is shipped on it, and the run ends within its budget.
    import visiontune.auto.selection as selection

    real_plan = selection.make_plan
    # The plan's estimate before anything is measured: 1 s a cost-1 step (its timed forward pass takes no steps here).
    monkeypatch.setattr(selection, "make_plan", lambda *a, **k: (real_plan(*a, **k)[0], 1.0))
    clock, jobs = steps_clock
    sel = _select(tmp_path, clock, 24, prune=False, prior=_Learned(A.name))
    record = sel.run()
    state = sel.record.state["finetune"]
    assert [(n, d) for n, _, d, _ in jobs] == [("lora-q-v-r4-fold1", pytest.approx(8.4))]
    assert state[A.name]["status"] == "budget" and state[A.name]["steps"] == 8 and not state[A.name]["folds"]
    assert all(state[c.name]["status"] == "budget" and "not started" in state[c.name]["why"] for c in (B, C))
    decision = record["decision"]
    assert decision["candidate"] == A.name and "on the prior alone" in decision["reason"]
    rows = {r["candidate"]: r for r in record["leaderboard"]}
    assert rows[A.name]["basis"] == "prior alone" and rows[A.name]["gain"]["prior_share"] == 1.0
    assert rows[A.name]["gain"]["mean"] == pytest.approx(0.05) and not rows[B.name].get("eligible")  # B: flat prior
    assert record["final"]["method"] == A.name and "4 epochs: no fold finished" in record["final"]["note"]
    assert record["elapsed_s"] == 8.0 + 12.0 <= 24.0


def test_only_a_learned_prior_and_no_judgement_against_it_admit_a_candidate_without_folds() -> None:
    from visiontune.auto.leaderboard import on_prior_alone, prior_pick

    learned, flat, fold = PriorGain(0.05, 0.03, "test"), PriorGain(), {"accuracy": 0.7}
    assert on_prior_alone({"status": "budget", "folds": []}, learned)
    assert on_prior_alone({"status": "partial (budget)", "folds": [fold]}, learned)  # one fold: no spread to read
    assert not on_prior_alone({"status": "budget", "folds": []}, flat)  # nothing known: the folds must speak
    assert not on_prior_alone({"status": "pruned", "folds": []}, learned)  # successive halving found it behind
    assert not on_prior_alone({"status": "skipped", "folds": []}, learned)
    assert not on_prior_alone({"status": "partial (budget)", "folds": [fold] * 2}, learned)  # judged on its folds
    prior = _Learned(A.name)
    assert prior_pick((A, B, C), {}, prior, {}, cost_margin=0.0) == A
    assert prior_pick((A, B, C), {}, prior, {}, cost_margin=5.0) is None  # +5 points does not clear a 5-point margin
    assert prior_pick((A, B, C), {A.name: {"status": "pruned", "folds": []}}, prior, {}, 0.0) is None
    assert prior_pick((A, B, C), {}, _Learned(A.name, mean=-0.02), {}, 0.0) is None  # expected to lose: the probe
