"""Issue 30, part 1: no command deletes or overwrites what visiontune did not make.

Every folder a command writes to (a run directory under resume and overwrite, ``auto --out``, a sweep's
``dir:``, an export target, a predictions file) gets a ``thesis.tex`` planted in it; each test checks that it
survives, and that a folder visiontune did not make is refused with its path and the fix. Each test failed on
the main branch before the issue (findings 1-5 and 10 are named in the test names' docstrings).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import visiontune as vt
from visiontune.cli import main
from visiontune.errors import ConfigError

THESIS = "\\documentclass{article} my only copy\n"
PRETRAIN_TINY = [  # tests/pretrain/test_pretrain_loop.py's tiny pretraining settings
    "data.dataset=digits", "data.max_images=48", "backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32",
    "crops.local_number=2", "crops.local_size=16", "ssl.prototypes=64", "ssl.head_hidden_dim=32",
    "ssl.head_bottleneck_dim=16", "explora.rank=4", "optim.steps=4", "optim.batch_size=8", "run.progress=false",
    "run.plot=false", "run.threads=1",
]
FAST = ["data.train_per_class=2", "data.test_per_class=2", "optim.head_init=zero", "optim.epochs=1"]


def plant(folder: Path, name: str = "thesis.tex") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(THESIS)
    return path


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its hash: what "nothing there was changed" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("visiontune: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


# ----------------------------------------------------------------------------- run directories (findings 1, 2)


@pytest.mark.parametrize("flag", ["run.resume=true", "run.overwrite=true"])
@pytest.mark.parametrize("content", ["other framework's checkpoint/", "config.yaml that is a list", "docker-compose config.yaml"])
def test_train_refuses_folders_it_did_not_make(tiny_overrides, tmp_path, capsys, flag, content):
    """Findings 1 and 2: run.resume / run.overwrite deleted a folder holding checkpoint/ or any config.yaml."""
    run_dir = tmp_path / "runs" / "q2"
    thesis = plant(run_dir)
    if content.startswith("other"):
        plant(run_dir / "checkpoint", "model.ckpt")
    elif "list" in content:
        (run_dir / "config.yaml").write_text("- a\n- b\n")
    else:
        (run_dir / "config.yaml").write_text("services:\n  web:\n    image: nginx\n")
    before = tree(run_dir)
    assert main(["train", *tiny_overrides, *FAST, "run.name=q2", flag, "run.progress=false"]) == 2
    _one_line_error(capsys, str(run_dir), "not a visiontune run directory", "run.name")
    assert tree(run_dir) == before and thesis.read_text() == THESIS


def test_overwrite_and_resume_touch_only_what_the_run_made(tiny_overrides, tmp_path):
    """Overwrite deletes the files the run's manifest lists, and a file the user added to the run stays."""
    common = [*tiny_overrides, *FAST, "method.name=linear", "run.name=mine"]
    from visiontune.atomic import read_manifest

    first = vt.train(vt.load_config(None, common))
    run_dir = first.run_dir
    manifest = read_manifest(run_dir)
    assert manifest is not None and manifest["kind"] == "train"
    assert {"config.yaml", "labels.json", "adapter.safetensors", "metrics.json", "report.md"} <= set(manifest["files"])
    thesis = plant(run_dir)
    notes = plant(run_dir / "my-notes", "draft.md")
    again = vt.train(vt.load_config(None, [*common, "run.resume=true"]))  # finished: kept as it is
    assert again.metrics == first.metrics and thesis.read_text() == THESIS
    # visiontune writes one file into the user's folder inside the run: only that file becomes the run's.
    from visiontune.infer.files import write_table

    write_table(run_dir / "my-notes" / "pred.csv", ["file", "label"], [["a.png", "x"]])
    assert "my-notes/pred.csv" in read_manifest(run_dir)["files"] and "my-notes" not in read_manifest(run_dir)["files"]
    vt.train(vt.load_config(None, [*common, "run.overwrite=true", "run.seed=3"]))
    assert thesis.read_text() == THESIS and notes.read_text() == THESIS
    assert not (run_dir / "my-notes" / "pred.csv").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["seed"] == 3
    assert not any(p.name.startswith(".visiontune-trash-") for p in run_dir.iterdir())


def test_an_older_run_without_manifest_is_still_a_run(tiny_overrides, tmp_path):
    """Runs made before manifests: a visiontune config.yaml plus a run's files; overwrite deletes only those."""
    from visiontune.atomic import MANIFEST_NAME, read_manifest

    common = [*tiny_overrides, *FAST, "method.name=linear", "run.name=old"]
    run_dir = vt.train(vt.load_config(None, common)).run_dir
    (run_dir / MANIFEST_NAME).unlink()
    thesis = plant(run_dir)
    res = vt.train(vt.load_config(None, [*common, "run.resume=true"]))
    assert res.metrics["test"] and read_manifest(run_dir)["kind"] == "train"  # adopted
    (run_dir / MANIFEST_NAME).unlink()
    vt.train(vt.load_config(None, [*common, "run.overwrite=true"]))
    assert thesis.read_text() == THESIS and (run_dir / "metrics.json").is_file()


def test_pretrain_refuses_folders_it_did_not_make(tmp_path, capsys):
    """Finding 1 in `pretrain`: a checkpoint/ folder from another framework made the folder a run to delete."""
    run_dir = tmp_path / "pre" / "q2"
    thesis = plant(run_dir)
    plant(run_dir / "checkpoint", "model.ckpt")
    before = tree(run_dir)
    for flag in ("run.resume=true", "run.overwrite=true"):
        assert main(["pretrain", *PRETRAIN_TINY, f"run.dir={tmp_path / 'pre'}", "run.name=q2", flag]) == 2
        _one_line_error(capsys, str(run_dir), "not a visiontune pretraining run directory")
    assert tree(run_dir) == before and thesis.read_text() == THESIS


def test_pretrain_overwrite_and_resume_keep_the_users_files(tmp_path, capsys):
    """A pretraining run replaced with run.overwrite=true: its files go, the thesis.tex planted beside them stays."""
    common = ["pretrain", *PRETRAIN_TINY, f"run.dir={tmp_path / 'pre'}", "run.name=p"]
    assert main(common) == 0
    run_dir = tmp_path / "pre" / "p"
    thesis = plant(run_dir)
    assert main([*common, "run.resume=true"]) == 0
    assert main([*common, "run.overwrite=true"]) == 0
    assert thesis.read_text() == THESIS and (run_dir / "backbone.json").is_file()
    capsys.readouterr()


def test_a_train_run_is_not_a_pretraining_run(tiny_overrides, tmp_path, capsys):
    """The manifest names the kind of run: pretraining with run.overwrite=true into a fine-tuning run is refused."""
    run_dir = vt.train(vt.load_config(None, [*tiny_overrides, *FAST, "method.name=linear", "run.name=ft"])).run_dir
    before = tree(run_dir)
    assert main(["pretrain", *PRETRAIN_TINY, f"run.dir={run_dir.parent}", "run.name=ft", "run.overwrite=true"]) == 2
    _one_line_error(capsys, "visiontune train folder")
    assert tree(run_dir) == before


def test_stale_temp_files_of_killed_writers_are_cleaned_on_start(tiny_overrides, tmp_path):
    """Minor list: a kill -9 during a save left a full-size .tmp file that nothing ever removed."""
    common = [*tiny_overrides, *FAST, "method.name=linear", "run.name=t"]
    run_dir = vt.train(vt.load_config(None, common)).run_dir
    dead = 2**22 + 12345  # above the usual pid_max: no such process
    stale = run_dir / f".adapter.safetensors.{dead}-0123abcd.tmp"
    stale.write_bytes(b"\0" * 1000)
    stale_ck = run_dir / "checkpoint" / f".last.safetensors.{dead}-89abcdef.tmp"
    stale_ck.parent.mkdir(exist_ok=True)
    stale_ck.write_bytes(b"\0" * 1000)
    live = run_dir / f".metrics.json.{os.getpid()}-01234567.tmp"  # a writer still running: left alone
    live.write_bytes(b"{}")
    lookalike = plant(run_dir, ".notes.1-0123abcd.txt")
    trash = plant(run_dir / ".visiontune-trash-999-abcdef", "0-adapter.safetensors").parent  # an interrupted overwrite
    vt.train(vt.load_config(None, [*common, "run.resume=true"]))
    assert not stale.exists() and not stale_ck.exists() and live.exists() and lookalike.read_text() == THESIS
    assert not trash.exists()


# ----------------------------------------------------------------------------- auto --out (finding 3)


def test_auto_out_refuses_a_folder_holding_a_run_it_did_not_make(tiny_overrides, tmp_path):
    """Finding 3: `auto --out DIR` replaced an existing run at DIR/model with its final retrain."""
    from visiontune.auto import AutoSelect, AutoSettings

    out = tmp_path / "runs"
    vt.train(vt.load_config(None, [*tiny_overrides, *FAST, "method.name=linear", "run.name=model"]))
    sel = AutoSelect("digits", out, AutoSettings(progress=False, folds=2),
                     overrides=[o for o in tiny_overrides if not o.startswith("run.dir")])
    for _ in ("the run alone", "the run and a thesis.tex"):
        before = tree(out)
        with pytest.raises(ConfigError, match=r"--out .*runs.* is not a visiontune auto folder.*choose a new or empty folder"):
            sel.run()
        assert tree(out) == before
        thesis = plant(out)
    assert thesis.read_text() == THESIS


# ----------------------------------------------------------------------------- sweep dir: (finding 4)


def test_sweep_dir_that_is_someone_elses_folder_is_refused(tiny_overrides, tmp_path):
    """Finding 4: a sweep whose dir: was a finished train run overwrote its report.md and results.csv."""
    from visiontune.sweep import aggregate, load_sweep, run_sweep

    run_dir = vt.train(vt.load_config(None, [*tiny_overrides, *FAST, "method.name=linear", "run.name=done"])).run_dir
    thesis = plant(run_dir)
    before = tree(run_dir)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": {"data": {"dataset": "digits"}, "backbone": {"name": "test_vit", "weights": "none"}},
                                    "dir": str(run_dir), "runs": [{"method.name": "linear"}]}))
    sweep = load_sweep(spec)
    with pytest.raises(ConfigError, match="is not a visiontune sweep folder"):
        run_sweep(sweep, progress=False)
    with pytest.raises(ConfigError, match="is not a visiontune sweep folder"):
        aggregate(sweep)
    assert tree(run_dir) == before and thesis.read_text() == THESIS


# ----------------------------------------------------------------------------- export --out (findings 5, 10)


@pytest.fixture
def run_copy(adapter_runs, tmp_path) -> Path:
    """A private copy of the session's LoRA run, to export into."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev/onnx extras")
    return Path(shutil.copytree(adapter_runs["colors"], tmp_path / "colors"))


def test_export_out_never_replaces_a_file_it_did_not_make(run_copy, capsys):
    """Finding 5: `export --out RUN/metrics.onnx` replaced the run's metrics.json with the export's JSON."""
    thesis = plant(run_copy / "export")
    before = tree(run_copy)
    assert main(["export", str(run_copy), "--out", str(run_copy / "metrics.onnx"), "--exporter", "legacy", "--no-check"]) == 2
    _one_line_error(capsys, str(run_copy / "metrics.json"), "not a visiontune export", "--out")
    (run_copy / "export" / "mine.onnx").write_bytes(b"user's model")
    assert main(["export", str(run_copy), "--out", str(run_copy / "export" / "mine.onnx"), "--exporter", "legacy",
                 "--no-check"]) == 2
    _one_line_error(capsys, "mine.onnx")
    before["export/mine.onnx"] = hashlib.sha256(b"user's model").hexdigest()
    assert tree(run_copy) == before
    # An export of its own name is replaced (twice, so the second replaces the first), the thesis stays.
    for _ in range(2):
        assert main(["export", str(run_copy), "--exporter", "legacy", "--no-check"]) == 0
        capsys.readouterr()
    meta = json.loads((run_copy / "export" / "model.json").read_text())
    assert meta["model"] == "model.onnx" and thesis.read_text() == THESIS
    assert not [p for p in (run_copy / "export").iterdir() if p.name.endswith(".tmp")]


def test_a_failed_export_leaves_the_previous_export_as_it_was(run_copy, monkeypatch, capsys):
    """Minor list: export wrote model.onnx in place, so a failed or killed export left a broken model under the
    export's name; and a killed export's staged model (full-size) is removed by the next export."""
    from visiontune.infer import onnxruntime as onnx_mod

    assert main(["export", str(run_copy), "--exporter", "legacy", "--no-check"]) == 0
    export = run_copy / "export"
    before = tree(export)
    dead = 2**22 + 12345  # above the usual pid_max: no such process
    (export / f".model.onnx.{dead}-0123abcd.tmp").write_bytes(b"\0" * 1000)

    def half_written(kind, model, example, out, opset):
        Path(out).write_bytes(b"half an onnx model")
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(onnx_mod, "_export_with", half_written)
    assert main(["export", str(run_copy), "--exporter", "legacy", "--no-check"]) == 2
    assert "killed mid-export" in capsys.readouterr().err
    assert tree(export) == before


def test_a_refused_int8_reexport_keeps_the_int8_model_kept_earlier(run_copy, monkeypatch):
    """Finding 10: a refused INT8 re-export deleted the INT8 model kept with --warn-only, and left its JSON."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter is the default")
    from visiontune.infer import export as export_mod

    monkeypatch.setattr(export_mod, "_drop_message", lambda acc, max_drop: (50.0, 50.0, "INT8 loses 50 points"))
    export_mod.export_run(run_copy, exporter="legacy", int8=True, calibration=8, warn_only=True)
    int8 = run_copy / "export" / "model.int8.onnx"
    kept = tree(run_copy / "export")
    assert int8.is_file() and int8.with_suffix(".json").is_file()
    with pytest.raises(ConfigError, match="refusing the INT8 model"):
        export_mod.export_run(run_copy, exporter="legacy", int8=True, calibration=8)
    after = tree(run_copy / "export")
    assert after["model.int8.onnx"] == kept["model.int8.onnx"] and after["model.int8.json"] == kept["model.int8.json"]
    assert not [n for n in after if n.endswith(".tmp")]
    # The INT8 model and its JSON still predict together.
    from visiontune.infer.backends import load_export

    assert load_export(int8.with_suffix(".json"), int8=True).classes


# ----------------------------------------------------------------------------- predictions files


def test_predictions_never_replace_a_file_visiontune_did_not_write(adapter_runs, tmp_path, capsys):
    """`predict --output` / `eval --predictions` replace only a predictions table visiontune wrote."""
    out = tmp_path / "results"
    thesis = plant(out)
    mine = out / "grades.csv"
    mine.write_text("student,grade\nada,A\n")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(img)
    run = str(adapter_runs["colors"])
    assert main(["predict", run, str(img), "--output", str(mine), "--device", "cpu"]) == 2
    _one_line_error(capsys, str(mine), "not a visiontune predictions file")
    assert main(["eval", run, "--predictions", str(mine), "--device", "cpu", "--quiet"]) == 2
    _one_line_error(capsys, str(mine))
    assert mine.read_text() == "student,grade\nada,A\n"
    ours = out / "pred.csv"
    for _ in range(2):  # the second run replaces the first one's table
        assert main(["predict", run, str(img), "--output", str(ours), "--device", "cpu"]) == 0
    assert ours.read_text().startswith("file,label_1,score_1") and thesis.read_text() == THESIS


# ----------------------------------------------------------------------------- done when: thesis.tex everywhere
#
# One visiontune-made folder of each kind (a train run with an export, a pretraining run, a sweep, an auto selection,
# a comparison) is made once; each case below copies one, plants a thesis.tex in it and in every folder under it,
# then runs one command with one combination of flags that writes there. The command either works or is refused
# in one line with the folder exactly as it was; either way every thesis.tex reads back unchanged.

TRAIN_TINY = ["data.dataset=digits", "backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32",
              "optim.batch_size=16", "run.progress=false", "run.measure_speed=false", *FAST, "method.name=linear"]
AUTO_TINY = ["backbone.name=test_vit", "backbone.weights=none", "data.train_per_class=4", "data.test_per_class=3",
             "optim.epochs=2", "run.progress=false"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Folders visiontune made, one of each kind, to copy: run (with export/ and tensorboard/), pretrain, sweep,
    auto, compare."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev/onnx extras")
    from visiontune.auto import AutoSelect, AutoSettings, Candidate

    root = tmp_path_factory.mktemp("made")
    assert main(["train", *TRAIN_TINY, f"run.dir={root}", "run.name=run", "run.tensorboard=true"]) == 0
    assert main(["export", str(root / "run"), "--exporter", "legacy", "--no-check"]) == 0
    assert main(["pretrain", *PRETRAIN_TINY, f"run.dir={root}", "run.name=pretrain"]) == 0
    spec = root / "sweep.yaml"
    base: dict[str, dict] = {}
    for key, value in (o.split("=", 1) for o in TRAIN_TINY):
        section, name = key.split(".")
        base.setdefault(section, {})[name] = yaml.safe_load(value)
    spec.write_text(yaml.safe_dump({"base": base, "dir": str(root / "sweep"), "runs": [{"method.name": "linear"}]}))
    assert main(["sweep", str(spec), "--quiet"]) == 0
    lora = (Candidate("lora q,v r4", ("method.name=lora", "method.targets=qv", "method.rank=4")),)
    AutoSelect("digits", root / "auto", AutoSettings(progress=False, candidates=lora, steps=2, folds=2),
               overrides=AUTO_TINY).run()
    assert main(["compare", str(root / "run"), "--out", str(root / "compare")]) == 0
    return {"root": root, "spec": spec, "lora": lora}  # type: ignore[dict-item]


def plant_everywhere(folder: Path) -> list[Path]:
    """A thesis.tex in ``folder`` and in every (not hidden) folder under it."""
    folders = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    return [plant(f) for f in folders]


def survives(folder: Path, command, capsys: pytest.CaptureFixture[str], refused: bool) -> list[Path]:
    """Plant thesis.tex everywhere in ``folder``, run ``command()`` (an exit code); a refusal (2) is one line and
    changes nothing there, a success (0) keeps every thesis.tex. Returns the planted files (for the caller's own
    checks)."""
    planted = plant_everywhere(folder)
    before = tree(folder)
    code = command()
    if refused:
        assert code == 2
        _one_line_error(capsys)
        assert tree(folder) == before
    else:
        assert code == 0, capsys.readouterr().err[-2000:]
    assert [p.read_text() for p in planted] == [THESIS] * len(planted)
    assert not [p for p in folder.rglob("*") if p.name.startswith(".visiontune-trash-")]
    capsys.readouterr()
    return planted


def _prepare(made: dict[str, Path], tmp_path: Path, kind: str, state: str) -> Path:
    """``tmp_path/kind`` as ``state`` says: a copy of visiontune's folder of that kind ("visiontune's..."), a copy of
    the train run ("a train run ..."), or the user's folder (empty: the thesis.tex will be all it holds)."""
    folder = tmp_path / kind
    if state.startswith("visiontune's"):
        shutil.copytree(made["root"] / kind, folder, symlinks=True)
    elif state.startswith("a train run"):
        shutil.copytree(made["root"] / "run", folder / "model" if kind == "auto" else folder, symlinks=True)
    folder.mkdir(exist_ok=True)
    return folder


RUN_FLAGS = [[], ["run.resume=true"], ["run.overwrite=true"], ["run.resume=true", "run.overwrite=true"],
             ["run.overwrite=true", "run.tensorboard=true"]]


@pytest.mark.parametrize("flags", RUN_FLAGS, ids=lambda f: " ".join(f) or "no flag")
@pytest.mark.parametrize("state", ["visiontune's", "the user's"])
def test_thesis_survives_train_in_its_run_dir(made, tmp_path, capsys, state, flags):
    run = _prepare(made, tmp_path, "run", state)
    # A finished run is replaced or resumed only when asked, and not when asked both (they contradict each other).
    refused = state == "the user's" or not flags or {"run.resume=true", "run.overwrite=true"} <= set(flags)
    kept = survives(run, lambda: main(["train", *TRAIN_TINY, f"run.dir={tmp_path}", "run.name=run", *flags]), capsys,
                    refused)
    assert (run / "thesis.tex").read_text() == THESIS and len(kept) >= 1
    assert (run / "metrics.json").is_file() == (state == "visiontune's")  # a finished run stays or is made again


@pytest.mark.parametrize("flags", RUN_FLAGS[:4], ids=lambda f: " ".join(f) or "no flag")
@pytest.mark.parametrize("state", ["visiontune's", "the user's", "a train run"])
def test_thesis_survives_pretrain_in_its_run_dir(made, tmp_path, capsys, state, flags):
    run = _prepare(made, tmp_path, "pretrain", state)
    refused = state != "visiontune's" or not flags or len(flags) == 2
    kept = survives(run, lambda: main(["pretrain", *PRETRAIN_TINY, f"run.dir={tmp_path}", "run.name=pretrain", *flags]),
                    capsys, refused)
    assert (run / "thesis.tex").read_text() == THESIS and len(kept) >= 1


@pytest.mark.parametrize("how", [[], ["--report"], ["--status"], ["--dry-run"]], ids=lambda f: " ".join(f) or "run")
@pytest.mark.parametrize("state", ["visiontune's", "the user's", "a train run"])
def test_thesis_survives_sweep_in_its_dir(made, tmp_path, capsys, state, how):
    folder = _prepare(made, tmp_path, "sweep", state)
    spec = yaml.safe_load(made["spec"].read_text())
    spec["dir"] = str(folder)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    writes = not how or how == ["--report"]
    refused = writes and state != "visiontune's"
    kept = survives(folder, lambda: main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet", *how]), capsys, refused)
    assert (folder / "thesis.tex").read_text() == THESIS and len(kept) >= 1
    if writes and not refused:
        assert (folder / "report.md").is_file()  # the sweep did write its own report beside the user's file


@pytest.mark.parametrize("state", ["visiontune's", "visiontune's, final retrain redone", "the user's",
                                   "a train run at OUT/model"])
def test_thesis_survives_auto_in_its_out_folder(made, tmp_path, capsys, state):
    from visiontune.auto import AutoSelect, AutoSettings

    out = _prepare(made, tmp_path, "auto", state)
    if "redone" in state:  # the final retrain into out/model (run.overwrite=true) runs again
        state_file = out / "auto.json"
        stored = json.loads(state_file.read_text())
        del stored["final"]
        state_file.write_text(json.dumps(stored))

    def command() -> int:
        try:
            AutoSelect("digits", out, AutoSettings(progress=False, candidates=made["lora"], steps=2, folds=2),
                       overrides=AUTO_TINY).run()
        except ConfigError as e:
            print(f"visiontune: error: {e}", file=sys.stderr)
            return 2
        return 0

    survives(out, command, capsys, refused=not state.startswith("visiontune's"))
    if state.startswith("visiontune's"):
        assert (out / "model" / "metrics.json").is_file()


@pytest.mark.parametrize("flags", [[], ["--int8", "--calibration", "8"], ["--out", "{folder}/mine.onnx"],
                                   ["--out", "{folder}/export/metrics.onnx"]], ids=lambda f: " ".join(f) or "default")
@pytest.mark.parametrize("state", ["exported before", "never exported"])
def test_thesis_survives_export_in_its_target_folder(made, tmp_path, capsys, state, flags):
    run = _prepare(made, tmp_path, "run", "visiontune's")
    if state == "never exported":
        shutil.rmtree(run / "export")
        (run / "export").mkdir()
    (run / "export" / "metrics.json").write_text('{"mine": 1}')  # the user's file of a name an export could take
    argv = ["export", str(run), "--exporter", "legacy", "--no-check", *(f.format(folder=run) for f in flags)]
    survives(run, lambda: main(argv), capsys, refused="export/metrics.onnx" in " ".join(argv))
    assert (run / "export" / "metrics.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("command", ["predict --output", "eval --predictions"])
@pytest.mark.parametrize("target", ["new.csv", "visiontune's.csv", "the user's.csv", "the user's file,label.csv"])
def test_thesis_survives_a_predictions_file_in_its_folder(made, tmp_path, capsys, command, target):
    """Predictions replace only a table visiontune wrote; a user's CSV, even one beginning ``file,label``, stays."""
    run = made["root"] / "run"
    folder = tmp_path / "out"
    folder.mkdir()
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    csv = folder / target
    users = {"the user's.csv": "student,grade\nada,A\n", "the user's file,label.csv": "file,label\nimg1.png,cat\n"}
    if target in users:
        csv.write_text(users[target])
    elif target == "visiontune's.csv":
        assert main(["predict", str(run), str(image), "--output", str(csv)]) == 0
    argv = (["predict", str(run), str(image), "--output", str(csv)] if command.startswith("predict")
            else ["eval", str(run), "--predictions", str(csv), "--quiet"])
    survives(folder, lambda: main(argv), capsys, refused=target in users)
    if target in users:
        assert csv.read_text() == users[target]


@pytest.mark.parametrize("state", ["visiontune's", "the user's"])
def test_thesis_survives_compare_in_its_out_folder(made, tmp_path, capsys, state):
    out = _prepare(made, tmp_path, "compare", state)
    kept = survives(out, lambda: main(["compare", str(made["root"] / "run"), "--out", str(out)]), capsys,
                    refused=state == "the user's")
    assert (out / "thesis.tex").read_text() == THESIS and len(kept) >= 1
    assert (out / "comparison.md").is_file() == (state == "visiontune's")
