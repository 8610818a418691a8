"""The command line: list, train with overrides, eval, compare, and clear errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from visiontune.cli import main


def test_list_methods_and_datasets(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for m in ("linear", "full", "scratch"):
        assert m in out
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "elpv" in out and "fashion-mnist" in out
    assert main(["list", "backbones"]) == 0
    assert "test_vit" in capsys.readouterr().out


def test_train_eval_compare(tiny_overrides, capsys, tmp_path):
    assert main(["train", *tiny_overrides, "method.name=linear", "run.name=l"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["accuracy"] <= 1
    run_dir = res["run_dir"]
    assert main(["eval", run_dir, "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["accuracy"] == res["accuracy"]
    assert main(["compare", run_dir, "--out", str(tmp_path / "cmp")]) == 0
    assert "linear" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "comparison.png").is_file()


def test_bad_config_exits_2_with_message(capsys):
    assert main(["train", "data.dataset=digits", "method.name=lorra", "optim.epochs=zero"]) == 2
    err = capsys.readouterr().err
    assert "method.name='lorra'" in err and "optim.epochs='zero' should be an integer" in err


def test_eval_of_non_run_dir(capsys, tmp_path):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a visiontune run directory" in capsys.readouterr().err


def test_lora_run_prints_no_bitsandbytes_warning(tmp_path):
    """peft imports bitsandbytes for every method; its AVX-512 BF16 'kernels-community' message is a false alarm."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "visiontune.cli", "train", "backbone.name=test_vit", "backbone.weights=none",
         "method.name=lora", "data.dataset=digits", "data.train_per_class=3", "data.test_per_class=2",
         "optim.epochs=1", "run.progress=false", "run.measure_speed=false", f"run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bitsandbytes" not in out.stderr and "gemm_4bit" not in out.stderr, out.stderr[-2000:]


# Issue 30, part 3: every subcommand, given bad input, ends in one line on stderr and exit code 2 before any work.
# Each command has a mistake of a path and one of a number (NaN, inf, out of range) or of usage, with a word the
# message must hold; a command added to the CLI without cases here fails test_every_subcommand_has_bad_inputs.
BAD_INPUTS = {
    "train": [(["data.dataset=digits", "optim.lr=nan"], "optim.lr"), (["data.dataset=/nonexistent/pics"], "data.dataset"),
              (["--no-such-flag"], "--no-such-flag")],
    "eval": [(["/nonexistent/run"], "/nonexistent/run"), (["/nonexistent/run", "--batch-size", "0"], "--batch-size 0"),
             (["/nonexistent/run", "--precision", "fp16"], "fp16")],
    "doctor": [(["--hub-timeout", "nan"], "--hub-timeout nan"), (["--hub-timeout", "-1", "--offline"], "--hub-timeout -1")],
    "list": [(["bogus"], "bogus"), ([], "required")],
    "compare": [(["/nonexistent/run"], "/nonexistent/run"), ([], "required")],
    "auto": [(["digits", "--folds", "1"], "--folds 1"), (["digits", "--budget", "nan"], "--budget"),
             (["digits", "--budget", "-5m"], "--budget")],
    "sweep": [(["/nonexistent/sweep.yaml"], "/nonexistent/sweep.yaml"), (["{file}", "--workers", "0"], "workers=0"),
              (["{file}", "--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run 0")],
    "estimate": [(["--device-memory", "lots"], "--device-memory"), (["optim.lr=inf"], "optim.lr"),
                 (["--num-classes", "-3"], "num_classes=-3")],
    "pretrain": [(["data.dataset=digits", "optim.lr=nan"], "optim.lr"), (["data.dataset=/nonexistent/pics"], "data.dataset")],
    "predict": [(["/nonexistent/run", "{file}"], "/nonexistent/run"), (["/nonexistent/run", "{file}", "--workers", "-1"], "--workers -1"),
                (["/nonexistent/run"], "required")],
    "serve": [(["--adapter", "a=/nonexistent/run", "--port", "0"], "/nonexistent/run"),
              (["--adapter", "a=/nonexistent/run", "--port", "-1"], "--port -1"),
              (["--adapter", "a=/nonexistent/run", "--port", "0", "--batch-wait-ms", "nan"], "nan")],
    "export": [(["/nonexistent/run"], "/nonexistent/run"), (["/nonexistent/run", "--opset", "0"], "--opset 0"),
               (["/nonexistent/run", "--max-drop", "nan"], "max_drop=nan")],
    "bench-infer": [(["/nonexistent/run"], "/nonexistent/run"), (["/nonexistent/run", "--min-time", "nan"], "--min-time nan"),
                    (["/nonexistent/run", "--rounds", "0"], "rounds=0")],
    "suggest": [(["/nonexistent/pics", "--budget", "5"], "/nonexistent/pics"), (["/nonexistent/pics", "--budget", "0"], "--budget 0"),
                (["/nonexistent/pics", "--budget", "five"], "five")],
    "label": [(["/nonexistent/picks.csv"], "/nonexistent/picks.csv"), (["{file}"], "not a picks file")],
}


def test_every_subcommand_has_bad_inputs():
    from visiontune.cli import command_parsers

    assert set(BAD_INPUTS) == set(command_parsers())


@pytest.mark.parametrize("argv, needle", [([c, *a], n) for c, cases in BAD_INPUTS.items() for a, n in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_subcommand_refuses_bad_input_in_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    """Exit code 2, exactly one line on stderr (``visiontune: error: ...``) naming the mistake, no traceback, and
    nothing written: doctor --hub-timeout nan was a ValueError traceback, eval --batch-size 0 and predict --workers -1
    were taken silently, export --opset 0 exported opset 18 with a logged traceback, sweep --cpus-per-run 0 was refused
    only after a Ray instance started, and argparse's usage errors took two lines."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # doctor must refuse the timeout before it would try the hub
    (tmp_path / "sweep.yaml").write_text("base: {data: {dataset: digits}}\nruns: [{method.name: linear}]\n")
    (tmp_path / "x.png").write_bytes(b"not read")
    argv = [a.format(file=tmp_path / ("sweep.yaml" if argv[0] == "sweep" else "x.png")) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visiontune: error: "), err
    assert needle in err, (needle, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused before any work
