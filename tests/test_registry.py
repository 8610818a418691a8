"""Registries: duplicate names raise, unknown names list valid choices and the closest match."""

import pytest

from visiontune.errors import ConfigError
from visiontune.registry import Registry


def test_duplicate_raises_and_unknown_suggests():
    r: Registry = Registry("widget", "widget.name")
    r.register("alpha", object())

    @r.register("beta")
    def beta():
        """Makes a beta."""

    assert r.names() == ["alpha", "beta"] and "beta" in r and r.help("beta") == "Makes a beta."
    with pytest.raises(ValueError, match="already registered"):
        r.register("alpha", object())
    with pytest.raises(ConfigError, match=r"widget.name='alpah' is not a known widget. Did you mean 'alpha'\?.*Valid: alpha, beta"):
        r.get("alpah")


def test_registry_imports_what_fills_it_on_first_read(tmp_path, monkeypatch):
    """A registry names the module that registers its entries and imports it the first time it is read, so a
    lookup never sees a half-filled registry whatever the caller imported first (``import visiontune`` imports
    none of them)."""
    import sys

    r: Registry = Registry("widget", "widget.name", filled_by=("vt_test_widgets",))
    (tmp_path / "vt_test_widgets.py").write_text(
        "from tests_registry_target import REG\nREG.register('cog', object(), help='a cog')\n"
        "assert 'cog' in REG  # a read while filling sees what is there, without importing itself again\n"
    )
    target = type(sys)("tests_registry_target")
    target.REG = r
    monkeypatch.setitem(sys.modules, "tests_registry_target", target)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vt_test_widgets", raising=False)
    assert "vt_test_widgets" not in sys.modules
    assert r.names() == ["cog"] and r.help("cog") == "a cog"
    assert "vt_test_widgets" in sys.modules


def test_a_failed_fill_is_retried_not_left_empty():
    r: Registry = Registry("widget", "widget.name", filled_by=("vt_test_missing_widgets",))
    with pytest.raises(ModuleNotFoundError):
        r.names()
    with pytest.raises(ModuleNotFoundError):  # the same error again, not an empty list
        r.get("cog")
