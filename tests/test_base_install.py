"""The base install (no extras): ``import visiontune`` and the command line's ``--help`` load nothing heavy,
every command's ``--help`` and ``visiontune list methods`` work with any optional package missing, and a
command that needs a missing one fails alone, in one line naming ``pip install 'visiontune[EXTRA]'``.

A missing package is simulated in a fresh interpreter by ``sys.modules[name] = None``: ``import name``
then raises ModuleNotFoundError and ``importlib.util.find_spec(name)`` answers None, as when it is not
installed. CI also installs the built wheel into an empty venv without extras (``make wheel-check``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from visiontune.cli import build_parser, command_parsers, main
from visiontune.extras import EXTRAS, extra_of, missing_message

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = sorted({m for modules in EXTRAS.values() for m in modules})
HEAVY = ("torch", "timm", "peft", "bitsandbytes", "onnx", "onnxruntime", "fastapi", "ray", "tensorboard",
         "torch.distributed.fsdp", "torch.distributed.tensor")  # the last two: ~2 s of a 2-core start, FSDP runs only


def _run(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``blocked`` modules made uninstallable."""
    prelude = f"import sys\nfor _m in {list(blocked)!r}:\n    sys.modules[_m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT)


def _commands() -> list[str]:
    return list(command_parsers())


def test_import_visiontune_and_help_load_no_heavy_package():
    out = _run(f"""
        import contextlib, io, json
        import visiontune
        after_import = sorted(m for m in {HEAVY!r} if m in sys.modules)
        from visiontune.cli import build_parser
        parser = build_parser()
        for command in {_commands()!r}:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                parser.parse_args([command, "--help"])
        print(json.dumps([after_import, sorted(m for m in {HEAVY!r} if m in sys.modules)]))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    after_import, after_help = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_import == [] and after_help == []


def test_list_methods_loads_no_peft_or_optional_package():
    out = _run(f"""
        import contextlib, io, json
        from visiontune.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            code = main(["list", "methods"])
        print(json.dumps([code, buf.getvalue(), sorted(m for m in {HEAVY!r} if m in sys.modules)]))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    code, listing, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert code == 0 and "lora" in listing and "qlora" in listing
    assert set(loaded) <= {"torch", "timm"}, loaded


@pytest.mark.parametrize("blocked", [(m,) for m in OPTIONAL] + [tuple(OPTIONAL)], ids=[*OPTIONAL, "all-optional"])
def test_every_help_and_list_methods_without(blocked):
    out = _run(f"""
        import contextlib, io, json
        from visiontune.cli import main
        results = {{}}
        for argv in [[c, "--help"] for c in {_commands()!r}] + [["--help"], ["list", "methods"]]:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                try:
                    code = main(argv)
                except SystemExit as e:
                    code = e.code
            results[" ".join(argv)] = [code, buf.getvalue()]
        print(json.dumps(results))
    """, blocked)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    failed = {argv: text[-500:] for argv, (code, text) in results.items() if code != 0}
    assert not failed, failed
    assert "lora" in results["list methods"][1]
    assert "pip install 'visiontune[serve]'" in results["serve --help"][1]
    assert "pip install 'visiontune[onnx]'" in results["export --help"][1]


def test_serve_without_fastapi_is_one_line_naming_the_extra(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['fastapi'] = None\n"
                          "from visiontune.cli import main; sys.exit(main(sys.argv[1:]))",
                          "serve", "--adapter", f"a={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'visiontune[serve]'" in lines[0], out.stderr


def test_a_missing_optional_package_fails_only_its_command(monkeypatch, capsys):
    def needs_ray(args):
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    parser = build_parser()
    monkeypatch.setattr("visiontune.cli.build_parser", lambda: parser)
    command_parsers(parser)["sweep"].set_defaults(func=needs_ray)
    assert main(["sweep", "some.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("visiontune: error: visiontune sweep needs the ray package (cluster extra), which is not "
                   "installed; install it with: pip install 'visiontune[cluster]'")


def test_a_missing_base_dependency_is_not_blamed_on_an_extra():
    assert missing_message("timm", "visiontune train") is None
    assert extra_of("onnxruntime.quantization") == "onnx" and extra_of("multipart") == "serve"


def test_extras_table_matches_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test_only = {"httpx", "playwright"}  # [serve] installs them for the service's tests; nothing imports them
    for extra, modules in EXTRAS.items():
        names = {req.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_") for req in extras[extra]}
        assert names - test_only == set(modules), extra
    assert set(extras) - {"dev", "docs"} == set(EXTRAS)


def test_python_dash_m_visiontune_is_the_console_script():
    out = subprocess.run([sys.executable, "-m", "visiontune", "list", "datasets"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "digits" in out.stdout


@pytest.mark.parametrize("argv, overrides, flag", [
    (["auto", "digits", "--dry-run", "backbone.weights=none"], ["backbone.weights=none"], ("dry_run", True)),
    (["auto", "digits", "backbone.weights=none", "--folds", "3", "method.rank=4"],
     ["backbone.weights=none", "method.rank=4"], ("folds", 3)),
    (["train", "method.name=lora", "--config", "configs/demo.yaml", "optim.lr=0.1"],
     ["method.name=lora", "optim.lr=0.1"], ("config", "configs/demo.yaml")),
    (["sweep", "configs/sweeps/x.yaml", "--workers", "2", "optim.epochs=1"], ["optim.epochs=1"], ("workers", 2)),
])
def test_options_and_overrides_in_any_order(argv, overrides, flag):
    args = build_parser().parse_args(argv)
    assert args.overrides == overrides and getattr(args, flag[0]) == flag[1]
