"""`visiontune predict`: folders recursed, bad files reported without stopping, table / JSON / CSV output."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import ModuleType

import pytest

from visiontune.cli import main


@pytest.fixture
def image_tree(tmp_path: Path, runs_helper: ModuleType) -> Path:
    """Images in nested folders, a corrupt image, a non-image file and a hidden file."""
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    runs_helper.noisy_image(runs_helper.COLORS["red"], 1).save(root / "a_red.png")
    runs_helper.noisy_image(runs_helper.COLORS["green"], 2).save(root / "sub" / "b_green.jpg", quality=95)
    runs_helper.noisy_image(runs_helper.COLORS["blue"], 3).save(root / "sub" / "deeper" / "c_blue.PNG")
    runs_helper.noisy_image(runs_helper.COLORS["blue"], 4).save(root / ".hidden" / "skip.png")
    (root / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (root / "notes.txt").write_text("not an image, not an image extension: skipped in folders")
    return root


def test_predict_folder_and_files_as_json(adapter_runs: dict[str, Path], image_tree: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["predict", str(adapter_runs["colors"]), str(image_tree), str(image_tree / "a_red.png"),
               str(image_tree / "nope.png"), "--top-k", "2", "--format", "json", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 1  # some inputs failed; the rest were predicted
    rows = {Path(r["file"]).name: r for r in json.loads(out)}
    assert set(rows) == {"a_red.png", "b_green.jpg", "c_blue.PNG", "corrupt.png", "nope.png"}
    assert rows["a_red.png"]["predictions"][0]["label"] == "red" and len(rows["a_red.png"]["predictions"]) == 2
    assert rows["b_green.jpg"]["predictions"][0]["label"] == "green"
    assert rows["c_blue.PNG"]["predictions"][0]["label"] == "blue"
    assert "cannot decode" in rows["corrupt.png"]["error"] and rows["nope.png"]["error"] == "no such file or folder"
    assert len(json.loads(out)) == 6  # a_red.png twice: once from the folder, once named
    assert "visiontune: skipped" in err and "corrupt.png" in err and "nope.png" in err and "skip.png" not in out


def test_predict_table_and_csv(adapter_runs: dict[str, Path], image_tree: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", str(adapter_runs["tone"]), str(image_tree / "a_red.png"), "--top-k", "5", "--quiet"]) == 0
    out, _ = capsys.readouterr()
    header, line = out.strip().splitlines()
    assert header.split() == ["file", "predictions"] and "a_red.png" in line
    assert {"dark", "light"} <= set(line.split()) and "ERROR" not in line  # k clipped to the 2 labels

    main(["predict", str(adapter_runs["colors"]), str(image_tree / "sub"), "--format", "csv", "--top-k", "3", "--quiet"])
    out, _ = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["file", "label_1", "score_1", "label_2", "score_2", "label_3", "score_3", "error"]
    by = {Path(r["file"]).name: r for r in rows}
    assert by["b_green.jpg"]["label_1"] == "green" and by["b_green.jpg"]["error"] == ""
    assert abs(sum(float(by["b_green.jpg"][f"score_{i}"]) for i in (1, 2, 3)) - 1) < 1e-4
    assert by["corrupt.png"]["label_1"] == "" and by["corrupt.png"]["error"]


def test_progress_bar_on_large_inputs_and_bad_options(adapter_runs: dict[str, Path], image_tree: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    # 4 images at batch size 2: "large" relative to the batch, so the bar shows (on stderr).
    assert main(["predict", str(adapter_runs["colors"]), str(image_tree / "a_red.png"), str(image_tree / "sub" / "b_green.jpg"),
                 str(image_tree / "a_red.png"), str(image_tree / "a_red.png"), "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert "predict: 100%" in err and "4/4" in err and len(out.strip().splitlines()) == 5
    assert main(["predict", str(adapter_runs["colors"]), str(image_tree), "--top-k", "0"]) == 2
    assert "top_k=0 is invalid" in capsys.readouterr().err
    assert main(["predict", str(image_tree), str(image_tree)]) == 2
    assert "not a visiontune run directory" in capsys.readouterr().err


def _fuzzed_dds() -> bytes:
    """A DDS header with no pixel-format flags: PIL's DDS plugin raises NotImplementedError on it."""
    import struct

    header = bytearray(120)
    struct.pack_into("<3I", header, 0, 0x1007, 4, 4)
    return b"DDS " + struct.pack("<I", 124) + bytes(header) + bytes(64)


def test_one_fuzzed_or_oversized_file_does_not_stop_the_others(
    adapter_runs: dict[str, Path], tmp_path: Path, runs_helper: ModuleType, capsys: pytest.CaptureFixture,
) -> None:
    """Issue 18, item 8: a fuzzed DDS raised NotImplementedError and `predict FOLDER` predicted nothing."""
    from PIL import Image

    runs_helper.noisy_image(runs_helper.COLORS["red"], 1).save(tmp_path / "a_red.png")
    (tmp_path / "b_fuzz.png").write_bytes(_fuzzed_dds())
    Image.new("L", (2_000, 10)).save(tmp_path / "c_strip.png")  # aspect 200:1
    runs_helper.noisy_image(runs_helper.COLORS["blue"], 2).save(tmp_path / "d_blue.png")
    rc = main(["predict", str(adapter_runs["colors"]), str(tmp_path), "--format", "json", "--quiet", "--top-k", "1"])
    out, err = capsys.readouterr()
    rows = {Path(r["file"]).name: r for r in json.loads(out)}
    assert "skipped" in err and "b_fuzz.png" in err
    assert rc == 1 and rows["a_red.png"]["predictions"][0]["label"] == "red"
    assert rows["d_blue.png"]["predictions"][0]["label"] == "blue"
    assert "NotImplementedError" in rows["b_fuzz.png"]["error"]
    assert "aspect ratio of 200:1" in rows["c_strip.png"]["error"] and "--max-aspect" in rows["c_strip.png"]["error"]
    # The limits are settings: raised, the strip is predicted too.
    assert main(["predict", str(adapter_runs["colors"]), str(tmp_path / "c_strip.png"), "--max-aspect", "250", "--quiet"]) == 0
    capsys.readouterr()


def test_predictor_api_takes_the_limits(adapter_runs: dict[str, Path], runs_helper: ModuleType) -> None:
    import visiontune as vt
    from visiontune.errors import DataError

    img = runs_helper.noisy_image(runs_helper.COLORS["green"], 3)  # 24 x 24
    small = vt.pipeline(str(adapter_runs["colors"]), max_pixels=500)
    assert small.limits.max_pixels == 500 and vt.pipeline(str(adapter_runs["colors"])).limits.max_pixels == 40_000_000
    with pytest.raises(DataError, match=r"24 x 24 = 576 pixels, over the limit of 500 .*raise max_pixels"):
        small(img)
    (result,) = small.predict_many([runs_helper.png_bytes(img)])
    assert "max_pixels" in result.error and result.predictions is None


@pytest.mark.filterwarnings("ignore:this CPU has no native bf16")
def test_predict_and_eval_take_the_precision(adapter_runs: dict[str, Path], image_tree: Path, capsys: pytest.CaptureFixture) -> None:
    run = str(adapter_runs["colors"])
    assert main(["predict", run, str(image_tree / "sub" / "deeper"), "--precision", "bf16", "--format", "json", "--quiet"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["predictions"][0]["label"] == "blue"
    assert main(["eval", run, "--precision", "bf16", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["eval", run, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


_BLOCK_PEFT = """
import importlib.abc, json, sys

BLOCKED = ("peft", "bitsandbytes")
tried = []


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"{name} is blocked by the test")
        return None


sys.meta_path.insert(0, Blocker())
"""
_REPORT = """
print(json.dumps({"code": code, "tried": tried, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


@pytest.mark.parametrize("run", ["colors", "big"])
def test_predict_imports_no_peft_or_bitsandbytes(run: str, adapter_runs: dict[str, Path], runs_helper: ModuleType,
                                                 tmp_path: Path) -> None:
    """``visiontune predict`` of a LoRA run (merged for inference) and of a linear probe, in a fresh interpreter where
    importing peft or bitsandbytes raises: the merged model is built from the saved tensors, so neither is asked for."""
    import subprocess
    import sys

    runs_helper.noisy_image(runs_helper.COLORS["red"], 7).save(tmp_path / "red.png")
    main = "from visiontune.cli import main\ncode = main(sys.argv[1:])\n"
    out = subprocess.run([sys.executable, "-c", _BLOCK_PEFT + main + _REPORT, "predict", str(adapter_runs[run]), str(tmp_path / "red.png"),
                          "--format", "json", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == {"code": 0, "tried": [], "loaded": []}
    (row,) = json.loads("\n".join(lines[:-1]))
    assert row["predictions"] and "error" not in row
    if run == "colors":
        assert row["predictions"][0]["label"] == "red"


def test_serving_a_linear_probe_imports_no_peft_or_bitsandbytes(adapter_runs: dict[str, Path]) -> None:
    """The service's host and app for a run with nothing to merge load neither package. (LoRA tasks in the host stay
    unmerged, so that every task shares one backbone (:mod:`visiontune.multi`): they need peft's layers.)"""
    import subprocess
    import sys

    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    serve = ("from visiontune.multi import AdapterHost\nfrom visiontune.serve.app import create_app\n"
             "app = create_app(AdapterHost.from_runs({'big': sys.argv[1]}))\ncode = 0\n")
    out = subprocess.run([sys.executable, "-c", _BLOCK_PEFT + serve + _REPORT, str(adapter_runs["big"])],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"code": 0, "tried": [], "loaded": []}
