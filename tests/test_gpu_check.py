"""benchmarks/gpu_check.py's CPU-runnable parts (issue 19 part 5): --dry-run runs every section on tiny backbones
(the DDP one through torch.distributed.run with gloo) and writes the JSON and Markdown a GPU run would."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("visiontune_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_section(gpu_check, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        rc = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and results["errors"] == [], results["errors"]
    assert [r["method"].split()[0] for r in results["steps"]] == ["lora", "dora", "qlora", "mona", "full"]
    for row in [*results["steps"], results["big"]]:
        assert row["step_ms"] > 0 and row["peak_estimate_gib"] > 0 and row["trainable"] > 0
    assert results["big"]["quantization"]["quantized_linears"] > 0 and results["big"]["grad_checkpointing"]
    assert results["eval"]["max_abs_logit_diff"] < 1e-3  # merged == unmerged (fp32 on the CPU)
    assert results["ddp"]["world_size"] == 1 and results["ddp"]["max_param_diff_across_ranks"] == 0.0
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (DRY RUN on CPU") and md in out
    for heading in ("## Training steps", "## QLoRA all-linear r64", "## Merged vs unmerged", "## DistributedDataParallel"):
        assert heading in md
    assert md.count("| test_vit_reg |") == 8  # 5 step cells, the big one, eval, ddp


def test_markdown_of_a_failed_section_and_bad_arguments(gpu_check, tmp_path, capsys):
    results = {"meta": {"command": "benchmarks/gpu_check.sh", "dry_run": False, "date": "2026-01-01", "torch": "2",
                        "timm": "1", "bitsandbytes": "0.5", "gpus": 1, "device_name": "H200", "precision": "bf16",
                        "wall_s": 300.0},
               "plan": gpu_check.plan(False), "steps": [], "big": None, "eval": None, "ddp": None,
               "errors": [{"section": "7b", "error": "OutOfMemoryError: CUDA out of memory\nmore"}],
               "skipped": ["steps vit_base_patch16_dinov3 full: over the time budget"]}
    j, md = gpu_check.write(results, tmp_path)
    text = md.read_text()
    assert "on H200" in text and "- **7b**: OutOfMemoryError: CUDA out of memory" in text and "more" not in text
    assert "- skipped: steps vit_base_patch16_dinov3 full" in text and json.loads(j.read_text())["meta"]["gpus"] == 1
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--sections", "steps,warp"])
    assert "unknown ['warp']" in capsys.readouterr().err
