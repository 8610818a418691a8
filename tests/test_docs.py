"""The documentation says what the code does: every ``visiontune ...`` command shown in the README and the docs
site parses with the real parser (options and ``key=value`` overrides in any order, as users type them), the cheap
ones (list, doctor, train, predict, eval) run as shown on a tiny model, the generated reference covers every command
and every configuration key, and every marked figure is the value its result file gives (benchmarks/figures.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from visiontune.cli import build_parser, command_parsers
from visiontune.config import _SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "2>", "&", "2>&1"}


def _logical_lines(text: str) -> list[str]:
    """Lines of the fenced code blocks and inline code spans, with ``\\`` continuations joined."""
    out: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        out += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    # An inline span naming a command alone ("`visiontune auto` chooses ...") mentions it; one with arguments shows it.
    out += [span for span in re.findall(r"`(visiontune [^`]+)`", prose) if len(span.split()) > 2]
    return out


def _command(line: str) -> list[str] | None:
    """The argument list after ``visiontune`` (or ``python -m visiontune``) on a shell line, or None."""
    line = line.strip().removeprefix("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w == "visiontune" or w.endswith("/visiontune") or (w in ("visiontune", "visiontune.cli") and words[i - 1] == "-m"):
            args = []
            for a in words[i + 1:]:
                if a in _SHELL_STOP or a.startswith((">", "2>")):
                    break
                args.append(a)
            return args or None
    return None


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line in _logical_lines(page.read_text()):
            args = _command(line)
            if args is not None and args[0] in command_parsers() or (args and args[0].startswith("-")):
                found.append((f"{page.relative_to(ROOT)}: visiontune {' '.join(args)}", args))
    return found


COMMANDS = _documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40  # the pages were read, not skipped


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            assert e.code == 0, f"{where}\n{err.getvalue()}"


def test_cli_reference_covers_every_command_and_option():
    from visiontune.reference import cli_reference

    text = cli_reference()
    for name, parser in command_parsers().items():
        assert f"## visiontune {name}" in text
        for action in parser._actions:
            for option in action.option_strings if action.dest != "help" else ():
                assert f"`{option}`" in text, (name, option)


def test_config_reference_covers_every_key_and_method_option():
    from visiontune.config import MethodConfig
    from visiontune.reference import config_reference
    from visiontune.registry import METHODS

    text = config_reference()
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in text
    base = {f.name for f in dataclasses.fields(MethodConfig)}
    for name in METHODS.names():
        assert f"### method.name={name}" in text
        for f in dataclasses.fields(METHODS.get(name).config_cls):
            if f.name not in base:
                assert f"`method.{f.name}`" in text, (name, f.name)


# ----------------------------------------------------------------------------- measured figures (benchmarks/figures.py)


def _figures_module():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("visiontune_docs_figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FIGURES = _figures_module()


def test_every_quoted_figure_is_its_source_value():
    """A figure marked in a page (``<!--fig:ID-->text<!--/fig-->``) reads what its result file gives."""
    values = FIGURES.values()
    quoted = [(page.relative_to(ROOT), m.group(1), m.group(2))
              for page in FIGURES.pages() for m in FIGURES.MARKER.finditer(page.read_text())]
    assert len(quoted) >= 10 and {fid for _, fid, _ in quoted} == set(FIGURES.FIGURES)  # each defined figure is used
    wrong = [f"{page}: {fid} reads {text!r}, its source gives {values.get(fid, 'nothing: unknown figure')!r}"
             for page, fid, text in quoted if values.get(fid) != text]
    assert not wrong, "\n".join(wrong) + "\nfix: python benchmarks/figures.py --write (after checking the source)"


def test_a_changed_source_changes_what_the_pages_must_read():
    page = "probe <!--fig:fmnist50.probe-->76.7<!--/fig-->% and <!--fig:bench.total-->15.6 min<!--/fig-->"
    values = {**FIGURES.values(), "fmnist50.probe": "75.0"}
    assert FIGURES.render(page, values) == page.replace(">76.7<", ">75.0<")
    assert FIGURES.render(page, values, keep_markers=False) == "probe 75.0% and 15.6 min"
    with pytest.raises(KeyError):
        FIGURES.render("<!--fig:no.such-->1<!--/fig-->", values)
    shown_as_code = "write `<!--fig:ID-->text<!--/fig-->` in the page"  # an example of the syntax, not a figure
    assert FIGURES.render(shown_as_code, values) == shown_as_code


def test_the_figures_page_names_command_machine_and_date_of_every_source():
    text = FIGURES.figures_page(FIGURES.values())
    for src in {fig.source for fig in FIGURES.FIGURES.values()}:
        section = text.split(f"## `{src.path}`")[1].split("\n## ")[0]
        assert f"Command: `{src.command}`" in section and re.search(r"Machine: \S", section), section
        assert re.search(r"Date: \d{4}-\d\d-\d\d", section), section
    assert "| `fmnist50.margin` | +5.5 ± 1.8 |" in text and "`docs/how-to/methods.md`" in text


# ----------------------------------------------------------------------------- the cheap commands, run on a tiny model

TINY_RUN = ["backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32", "data.dataset=digits",
            "data.train_per_class=4", "data.test_per_class=4", "data.val_per_class=null", "optim.epochs=1",
            "optim.batch_size=16", "run.progress=false", "run.measure_speed=false", "run.plots=false",
            "data.channels=null", "data.bands=null", "backbone.rgb_bands=null"]  # a multispectral command on digits
"""Appended to a documented ``train`` (later overrides win): the same command, seconds long on a random tiny ViT."""
RUN_NAMES = {"RUN", "runs/demo/my-run", "runs/demo/my-full", "runs/smoke/lora"}
"""What the pages call a finished run: replaced by a tiny LoRA run trained here."""
FOLDERS = {"my_images/", "photos/", "digits-png/", "imgs/", "big_folder/"}
"""What the pages call an image folder: replaced by a folder of labelled PNGs (the run's labels as subfolders)."""
OUTPUTS = {"preds.csv"}
EXPECTED_ERRORS = {"lorra": "Did you mean"}
"""Documented on purpose as a mistake: a word of the command and what its one-line error must say."""
CHEAP = ("list", "doctor", "train", "predict", "eval")
"""Commands that run in seconds on a tiny model and need no extra (serve, export, sweep, auto, pretrain do not)."""


def _runnable(args: list[str]) -> bool:
    """A documented command this test can run as shown: a cheap command with no shell variable, ``...``, other
    backend or file that the substitutions above do not provide."""
    if args[0] not in CHEAP or "--backend" in args or "--int8" in args:
        return False
    for a in args[1:]:
        if a.startswith("$") or a == "..." or (a.startswith("--config") is False and a.endswith(".yaml")
                                               and not (ROOT / a).is_file()):
            return False
        if args[0] in ("predict", "eval") and "/" in a and not a.startswith("-") and "=" not in a \
                and a not in RUN_NAMES | FOLDERS and not (ROOT / a).exists():
            return False
    config = args[args.index("--config") + 1] if "--config" in args else None
    return config is None or (ROOT / config).is_file()


RUNNABLE = [(w, a) for w, a in COMMANDS if _runnable(a)]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A finished tiny LoRA run and an image folder with its labels as subfolders."""
    import json

    import numpy as np
    from PIL import Image

    from visiontune.cli import main

    base = tmp_path_factory.mktemp("docs-commands")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["train", *TINY_RUN, "method.name=lora", f"run.dir={base / 'runs'}", "run.name=tiny"]) == 0, out.getvalue()
    run = base / "runs" / "tiny"
    rng = np.random.default_rng(0)
    for label in json.loads((run / "labels.json").read_text()):
        (base / "images" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(base / "images" / label / f"{i}.png")
    return {"run": str(run), "images": str(base / "images"), "base": str(base)}


def test_some_documented_commands_are_run():
    assert {a[0] for _, a in RUNNABLE} == set(CHEAP) and len(RUNNABLE) >= 12


@pytest.mark.slow
@pytest.mark.parametrize("where, args", RUNNABLE, ids=[w for w, _ in RUNNABLE])
def test_cheap_documented_command_runs_on_a_tiny_model(where, args, tiny_world, monkeypatch, tmp_path):
    """The command as the page shows it, with run / folder / output names pointing at tiny stand-ins."""
    from visiontune.cli import main

    monkeypatch.chdir(ROOT)  # the pages' relative paths (configs/...) are from the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # doctor: no network probe
    argv = [tiny_world["run"] if a in RUN_NAMES else tiny_world["images"] if a in FOLDERS
            else str(tmp_path / a) if a in OUTPUTS else a for a in args]
    if argv[0] == "train":
        argv += [*TINY_RUN, f"run.dir={tmp_path / 'runs'}"]
    expected = next((msg for word, msg in EXPECTED_ERRORS.items() if any(word in a for a in args)), None)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if expected:
        assert code == 2 and expected in err.getvalue(), f"{where}\n{err.getvalue()[-2000:]}"
    else:
        assert code == 0, f"{where}\n{out.getvalue()[-1000:]}\n{err.getvalue()[-2000:]}"


@pytest.mark.slow
def test_the_estimate_shown_in_the_docs_is_what_the_command_prints(monkeypatch):
    """The 7B recipe's memory estimate in the scale-out tutorial is the command's output (it is computed, not measured,
    so it must match to the last digit)."""
    from visiontune.cli import main

    page = (ROOT / "docs" / "tutorials" / "scale-out.md").read_text()
    block = re.search(r"```\n\$ (visiontune estimate [^\n]+)\n(.*?)```", page, re.S)
    assert block, "the estimate example is gone from docs/tutorials/scale-out.md"
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(shlex.split(block.group(1))[1:]) == 0
    assert out.getvalue().strip() == block.group(2).strip()
