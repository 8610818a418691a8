"""MkDocs hooks: the reference pages are rendered from the code at build time (visiontune.reference), and every
measured figure a page marks (``<!--fig:ID-->...<!--/fig-->``) is rendered from its result file
(``benchmarks/figures.py``), which also gives the generated *Measured figures* page."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from mkdocs.structure.files import File, Files


@cache
def _figures() -> tuple[ModuleType, dict[str, str]]:
    spec = importlib.util.spec_from_file_location("visiontune_docs_figures", Path(__file__).parents[1] / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module, module.values()


def on_files(files: Files, config: Any) -> Files:
    from visiontune.reference import cli_reference, config_reference

    module, values = _figures()
    pages = (("reference/cli.md", cli_reference()), ("reference/config.md", config_reference()),
             ("reference/figures.md", module.figures_page(values)))
    for uri, text in pages:
        files.append(File.generated(config, uri, content=text))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    module, values = _figures()
    return module.render(markdown, values, keep_markers=False)
