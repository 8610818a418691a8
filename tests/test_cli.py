"""The command line: list, train with overrides, eval, compare, and clear errors with exit code 2."""

from __future__ import annotations

import json

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
