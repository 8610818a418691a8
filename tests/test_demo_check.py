"""The README's demo table is held against the demo's own output (``make demo-check``, run by CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontune import demo

TABLE = """| method | backbone | weights | trainable params | train time | test accuracy (%) | weighted F1 | macro F1 | latency ms/img | throughput img/s |
|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|
| linear | vit_small_patch14_dinov2 | offline | 1.5K (<0.01%) | 5.3 s | **51.0** | 0.514 | 0.509 | 39.2 | 45.7 |
| lora (q,v r8) | vit_small_patch14_dinov2 | offline | 149.0K (0.69%) | 59.7 s | 50.0 | 0.506 | 0.504 | 57.5 | 39.8 |"""
MACHINE = {"cpu": "Some CPU", "isa": ["avx2"], "torch": "2.14.1", "capability": "AVX2", "threads": 2}


def _readme(table: str = TABLE, machine: dict | None = MACHINE) -> str:
    comment = f"<!-- demo-machine: {json.dumps(machine)} -->\n" if machine else ""
    return f"# x\n\ntext\n\n{demo.README_START}\n{comment}{table}\n{demo.README_END}\n\nmore\n"


def _record(table: str = TABLE, machine: dict = MACHINE) -> dict:
    return {"machine": machine, "table": table, "test_images": [386, 386]}


def test_identical_output_on_the_same_machine_passes() -> None:
    # Times differ from run to run and are not compared.
    assert demo.check(_readme(), _record(TABLE.replace("59.7 s", "61.0 s").replace("39.2", "44.0"))) == []


def test_any_metric_change_on_the_same_machine_fails() -> None:
    problems = demo.check(_readme(), _record(TABLE.replace("| 50.0 |", "| 49.7 |")))
    assert len(problems) == 1 and "test accuracy README 50.0 vs demo 49.7 on the same machine" in problems[0]


def test_other_machine_gets_the_binomial_tolerance() -> None:
    other = dict(MACHINE, cpu="Another CPU", isa=["avx2", "avx512f"])
    near = TABLE.replace("| 50.0 | 0.506 | 0.504 |", "| 45.6 | 0.460 | 0.462 |")  # ~1.2 SE on 386 images
    assert demo.check(_readme(), _record(near, other)) == []
    far = TABLE.replace("| 50.0 | 0.506 | 0.504 |", "| 35.0 | 0.350 | 0.340 |")  # ~4 SE
    problems = demo.check(_readme(), _record(far, other))
    assert len(problems) == 3 and all("standard errors apart" in p for p in problems)


def test_structure_must_match_exactly() -> None:
    changed = TABLE.replace("149.0K (0.69%)", "298.0K (1.38%)")
    assert "row 2" in demo.check(_readme(), _record(changed))[0]
    one_row = "\n".join(TABLE.splitlines()[:3])
    assert "README lists 2 demo rows, the demo produced 1" in demo.check(_readme(), _record(one_row))[0]
    with pytest.raises(ValueError, match="no demo table"):
        demo.check("# README without markers", _record())


def test_readme_has_a_checkable_demo_block() -> None:
    """The real README: markers, a recorded machine, and the five demo rows in the demo's order."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block, machine = demo.readme_block(text)
    assert machine is not None and {"cpu", "isa", "torch", "capability", "threads"} <= set(machine)
    rows = demo._rows(block)
    assert len(rows) == len(demo.EXPERIMENTS)
    assert [r[0].split(" ")[0] for r in rows] == [overrides[0].split("=", 1)[1] for _, overrides in demo.EXPERIMENTS]


def test_check_command_reads_the_demo_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "comparison.json").write_text(json.dumps(_record()))
    readme = tmp_path / "README.md"
    readme.write_text(_readme())
    assert demo.main(["--check", str(readme), "--results", str(tmp_path)]) == 0
    assert "identical (same machine)" in capsys.readouterr().out
    readme.write_text(_readme(TABLE.replace("| 50.0 |", "| 40.0 |")))
    assert demo.main(["--check", str(readme), "--results", str(tmp_path)]) == 1
    assert demo.main(["--check", str(readme), "--results", str(tmp_path / "missing")]) == 2


def test_demo_auto_chooses_on_the_demo_split(tmp_path: Path) -> None:
    """`make demo`'s last part: auto on the demo config's data and backbone (here swapped for tiny ones)."""
    from visiontune.demo import run_auto

    extra = ["data.dataset=digits", "data.train_per_class=4", "data.test_per_class=3", "backbone.name=test_vit",
             "backbone.weights=none", "backbone.img_size=null", f"run.dir={tmp_path}", "run.progress=false"]
    record = run_auto(extra, "0.001")  # 1 ms: no fine-tuning fold fits on any machine, only the cheap candidates run
    assert record["decision"]["candidate"] in {"linear probe", "nearest prototype"}
    assert (tmp_path / "auto" / "leaderboard.md").is_file() and record["test_images"] == 30
    assert record["backbone"] == "test_vit"
