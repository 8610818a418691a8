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
