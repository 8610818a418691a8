"""MkDocs hook: the reference pages are rendered from the code at build time (visiontune.reference)."""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files


def on_files(files: Files, config: Any) -> Files:
    from visiontune.reference import cli_reference, config_reference

    for uri, text in (("reference/cli.md", cli_reference()), ("reference/config.md", config_reference())):
        files.append(File.generated(config, uri, content=text))
    return files
