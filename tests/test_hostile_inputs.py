"""Issue 30, parts 2 and 3: run folders and exports are checked, not trusted; nonsense is refused before work.

Each test reproduces a finding of the issue's third reliability pass (numbers in the docstrings) and failed on
the main branch before it: a traceback, silent mislabelling, or a long job that died at its end. Every user
mistake must end in one line on stderr (``visiontune: error: ...``), exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from visiontune.auto import AutoSelect, AutoSettings, parse_budget
from visiontune.cli import main
from visiontune.errors import ConfigError

SMALL = ["data.train_per_class=2", "data.test_per_class=2", "optim.head_init=zero", "optim.epochs=1"]


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The command's stderr: exactly one line, ``visiontune: error: ...``, holding every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visiontune: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(path)
    return path


@pytest.fixture
def run_copy(adapter_runs, tmp_path) -> Path:
    """A private copy of the session's LoRA run, free to damage."""
    return Path(shutil.copytree(adapter_runs["colors"], tmp_path / "colors"))


# ----------------------------------------------------------------------------- finding 12: numbers in the config


@pytest.mark.parametrize("setting", [
    "optim.lr=nan", "optim.head_lr=inf", "optim.weight_decay=nan", "optim.clip_grad=nan", "optim.lr=1e400",
    "optim.warmup_epochs=-inf", "data.crop_scale=nan",
])
def test_non_finite_numbers_are_refused_before_any_work(tiny_overrides, tmp_path, capsys, setting):
    """Finding 12: NaN/inf for optim.lr, head_lr, weight_decay, clip_grad passed validation; training crashed."""
    assert main(["train", *tiny_overrides, setting]) == 2
    one_line_error(capsys, setting.split("=")[0], "finite number")
    assert not (tmp_path / "runs").exists()


def test_non_finite_numbers_are_refused_in_pretraining_configs(capsys):
    assert main(["pretrain", "data.dataset=digits", "backbone.name=test_vit", "backbone.weights=none", "optim.lr=nan"]) == 2
    one_line_error(capsys, "optim.lr", "finite number")


# ----------------------------------------------------------------------------- finding 7: auto --budget / --folds


@pytest.mark.parametrize("budget", ["nan", "inf", "1e400", "", "0", "-5m", "-1", "nanm", "soon"])
def test_budgets_that_are_not_a_positive_duration_are_refused(budget):
    """Finding 7: `--budget nan` meant no budget (it ran past 5 minutes); inf, 1e400, '', 0, negatives passed."""
    with pytest.raises(ConfigError, match="--budget .* is not a duration above zero"):
        parse_budget(budget)
    assert parse_budget("20m") == 1200 and parse_budget(None) is None


@pytest.mark.parametrize("flags", [["--budget", "nan"], ["--budget", ""], ["--folds", "0"], ["--folds", "1"]])
def test_auto_refuses_bad_budget_and_folds_before_work(tiny_overrides, tmp_path, capsys, flags):
    """Finding 7 through the command line: refused before the folder is made or any data is read."""
    out = tmp_path / "sel"
    overrides = [o for o in tiny_overrides if not o.startswith("run.dir")]
    assert main(["auto", "digits", *overrides, "--out", str(out), *flags]) == 2
    one_line_error(capsys, flags[0])
    assert not out.exists()


def test_ray_gpus_per_run_must_be_a_finite_number():
    from visiontune.sweep.cluster import check_executor

    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="--gpus-per-run"):
            check_executor("ray", gpus_per_run=bad)


def test_auto_select_refuses_a_nan_budget_and_zero_folds_from_python(tmp_path):
    with pytest.raises(ConfigError, match="--budget"):
        AutoSettings(budget_s=float("nan"))
    with pytest.raises(ConfigError, match="--folds 0"):
        AutoSettings(folds=0)


# ----------------------------------------------------------------------------- finding 9: output paths up front


def test_eval_predictions_to_an_unwritable_path_fails_before_evaluating(adapter_runs, capsys, monkeypatch):
    """Finding 9: `eval --predictions` to an unwritable path evaluated everything, then died with a traceback."""
    import visiontune.infer.evaluate as evaluate

    def no_work(*args, **kwargs):
        raise AssertionError("evaluation started before the output path was checked")

    monkeypatch.setattr(evaluate, "load_run", no_work)
    assert main(["eval", str(adapter_runs["colors"]), "--predictions", "/proc/visiontune-test/x.csv", "--quiet"]) == 2
    one_line_error(capsys, "/proc/visiontune-test/x.csv", "not writable")


# ----------------------------------------------------------------------------- finding 13: one line, never a traceback


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
@pytest.mark.parametrize("command", ["eval", "predict", "export", "bench-infer", "serve"])
def test_a_damaged_adapter_file_is_one_clear_error_in_every_command(run_copy, image, capsys, damage, command):
    """Finding 13: a pickle or truncated adapter.safetensors gave a traceback in eval/predict/export/bench-infer/serve."""
    adapter = run_copy / "adapter.safetensors"
    if damage == "pickle":
        adapter.write_bytes(pickle.dumps({"head.weight": [1.0, 2.0]}))
    else:
        adapter.write_bytes(adapter.read_bytes()[:100])
    argv = {
        "eval": ["eval", str(run_copy), "--quiet"],
        "predict": ["predict", str(run_copy), str(image)],
        "export": ["export", str(run_copy), "--exporter", "legacy", "--no-check"],
        "bench-infer": ["bench-infer", str(run_copy), "--backends", "torch", "--batch-sizes", "1", "--iters", "1"],
        "serve": ["serve", "--adapter", f"colors={run_copy}", "--port", "0"],
    }[command]
    assert main(argv) == 2
    one_line_error(capsys, str(adapter), "not a readable safetensors adapter")


def test_garbage_onnx_is_one_clear_error(exported_runs, tmp_path, image, capsys):
    """Finding 13: a garbage .onnx gave an onnxruntime traceback."""
    export = Path(shutil.copytree(exported_runs["colors"] / "export", tmp_path / "export"))
    (export / "model.onnx").write_bytes(b"this is not an onnx model")
    assert main(["predict", str(export / "model.onnx"), str(image), "--backend", "onnxruntime"]) == 2
    one_line_error(capsys, "model.onnx", "not a model onnxruntime can load")


@pytest.mark.parametrize("argv", [
    ["predict", "{run}", "{image}", "--output", "/sys/visiontune-test.csv"],
    ["predict", "{run}", "{image}", "--device", "nonsense"],
    ["compare", "{run}", "--out", "{image}"],
    ["compare", "{run}", "--out", "/proc/visiontune-test/cmp"],
    ["serve", "--adapter", "colors={run}", "--max-aspect", "inf"],
    ["serve", "--adapter", "colors={run}", "--batch-wait-ms", "inf"],
    ["bench-infer", "{run}", "--min-time", "nan"],
    ["export", "{run}", "--int8", "--smoothing", "nan"],
    ["export", "{run}", "--max-drop", "inf"],
])
def test_cli_mistakes_are_one_line(adapter_runs, image, capsys, argv):
    """Finding 13 (predict --output /sys/x.csv, predict --device nonsense, compare --out <existing file>) and
    part 3 (NaN / inf in the commands' own numeric flags), each refused before any work."""
    argv = [a.format(run=adapter_runs["colors"], image=image) for a in argv]
    assert main(argv) == 2
    one_line_error(capsys)


def test_an_unwritable_run_dir_is_refused_before_training(tiny_overrides, capsys, monkeypatch):
    """Part 3: output paths are checked before a long job; an unwritable run.dir is one line, before any training."""
    from visiontune.train import loop

    def no_work(*args, **kwargs):
        raise AssertionError("training started before the run directory was checked")

    monkeypatch.setattr(loop, "_fit_loop", no_work)
    monkeypatch.setattr(loop, "_fit_cached", no_work)
    assert main(["train", *tiny_overrides, *SMALL, "run.dir=/proc/visiontune-test", "run.name=r"]) == 2
    one_line_error(capsys, "/proc/visiontune-test", "not writable")


def test_a_stale_world_size_without_a_launcher_is_one_clear_error(tiny_overrides, tmp_path, capsys, monkeypatch):
    """Finding 13: WORLD_SIZE=2 left in the shell (no torchrun) ended in a traceback from the process group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", *tiny_overrides, *SMALL]) == 2
    one_line_error(capsys, "WORLD_SIZE=2", "torchrun")
    assert not (tmp_path / "runs").exists()


MALFORMED_SWEEPS = {
    "not yaml": "base: [unclosed\n",
    "base is a list": {"base": [1, 2], "runs": [{"method.name": "linear"}]},
    "dir is a list": {"dir": ["a", "b"]},
    "seeds are words": {"seeds": ["one", "two"]},
    "seeds is a number": {"seeds": 3},
    "runs are not mappings": {"runs": ["linear", "lora"]},
    "grid is a list": {"grid": ["method.name", "lora"]},
    "binary file": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("case", list(MALFORMED_SWEEPS))
def test_malformed_sweep_specs_are_one_clear_error(tmp_path, capsys, case):
    """Finding 13: six malformed sweep specs gave tracebacks (`sweep --status`)."""
    spec = MALFORMED_SWEEPS[case]
    path = tmp_path / "sweep.yaml"
    if isinstance(spec, bytes):
        path.write_bytes(spec)
    elif isinstance(spec, str):
        path.write_text(spec)
    else:
        path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--status"]) == 2
    one_line_error(capsys, str(path))


# ----------------------------------------------------------------------------- part 2: folders are cross-checked


def test_a_reordered_labels_json_is_refused_naming_both_files(run_copy, image, capsys):
    """Finding 8: a reordered labels.json was not checked against the adapter's classes: silent mislabelling."""
    labels = json.loads((run_copy / "labels.json").read_text())
    (run_copy / "labels.json").write_text(json.dumps(labels[::-1]))
    assert main(["predict", str(run_copy), str(image)]) == 2
    one_line_error(capsys, "labels.json", "adapter.safetensors", "mislabel")
    from visiontune.multi import AdapterHost

    with pytest.raises(ConfigError, match="labels.json does not match"):
        AdapterHost.from_runs({"colors": run_copy})


def _tampered_export(exported_runs, tmp_path: Path, edit) -> Path:
    export = Path(shutil.copytree(exported_runs["colors"] / "export", tmp_path / "export"))
    meta = json.loads((export / "model.json").read_text())
    edit(meta)
    (export / "model.json").write_text(json.dumps(meta))
    return export


@pytest.mark.parametrize("count", ["fewer", "more"])
def test_an_export_whose_json_has_another_label_count_is_refused(exported_runs, tmp_path, image, capsys, count):
    """Finding 6: 4 outputs with 10 labels mislabelled silently; 10 with 4 gave IndexError / a 500 per request."""
    def edit(meta):
        meta["classes"] = meta["classes"][:-1] if count == "fewer" else [*meta["classes"], *"abcdefg"]

    export = _tampered_export(exported_runs, tmp_path, edit)
    assert main(["predict", str(export / "model.json"), str(image), "--backend", "onnxruntime"]) == 2
    one_line_error(capsys, "model.onnx", "model.json", "labels")
    from visiontune.infer.backends import ExportHost

    with pytest.raises(ConfigError, match="not one export"):  # serve's start-up refuses it too
        ExportHost.from_exports({"colors": export / "model.json"})


def test_an_export_json_with_a_huge_preprocessing_size_is_refused(exported_runs, tmp_path, image, capsys):
    """Finding 11: preprocessing size 20000 in a tampered export JSON drove predict to 2.9 GB and a traceback."""
    def edit(meta):
        meta["preprocessing"]["input_size"] = [3, 20000, 20000]

    export = _tampered_export(exported_runs, tmp_path, edit)
    assert main(["predict", str(export / "model.json"), str(image), "--backend", "onnxruntime"]) == 2
    one_line_error(capsys, "model.json", "input_size")


# ----------------------------------------------------------------------------- minor list: auto resume


def test_auto_resume_accepts_reordered_overrides_and_names_changed_ones(tiny_overrides, tmp_path):
    """Minor list: `auto` refused a resume whose overrides were only reordered, saying "overrides differ" only."""
    base = [o for o in tiny_overrides if not o.startswith("run.dir")]
    out = tmp_path / "sel"
    quiet = AutoSettings(progress=False)
    first = AutoSelect("digits", out, quiet, overrides=[*base, "optim.lr=0.01", "optim.weight_decay=0.1"])
    first.record.save()
    AutoSelect("digits", out, quiet, overrides=[*base, "optim.weight_decay=0.1", "optim.lr=0.01"]).record.load()
    changed = AutoSelect("digits", out, quiet, overrides=[*base, "optim.weight_decay=0.1", "optim.lr=0.02"])
    with pytest.raises(ConfigError, match=r"override optim.lr: 0.01 in the stored selection, 0.02 now"):
        changed.record.load()
