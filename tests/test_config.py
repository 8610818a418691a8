"""Config: YAML load/dump, dotted overrides, type coercion, all-problems-at-once validation."""

from __future__ import annotations

import pytest
import yaml

import visiontune as vt
from visiontune.config import apply_overrides, parse_override
from visiontune.errors import ConfigError


def test_overrides_parse_yaml_values():
    assert parse_override("method.rank=8") == (["method", "rank"], 8)
    assert parse_override("method.targets=[q,v]") == (["method", "targets"], ["q", "v"])
    assert parse_override("data.train_per_class=null") == (["data", "train_per_class"], None)
    d = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=1e-4", "run.seed=3"])
    assert d == {"optim": {"lr": 1e-4}, "run": {"seed": 3}}


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="has no '='"):
        parse_override("method.name")


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump({"data": {"dataset": "digits", "train_per_class": 5}, "method": {"name": "linear"}}))
    cfg = vt.load_config(p, overrides=["method.name=full", "optim.epochs=3", "backbone.img_size=64"])
    assert cfg.data.dataset == "digits" and cfg.data.train_per_class == 5
    assert cfg.method.name == "full" and cfg.optim.epochs == 3 and cfg.backbone.img_size == 64
    # dump -> load round trip gives the same config
    out = cfg.dump(tmp_path / "resolved.yaml")
    assert vt.load_config(out) == cfg


def test_method_section_is_polymorphic():
    cfg = vt.load_config(None, ["data.dataset=digits", "method.name=linear", "method.views=3"])
    assert type(cfg.method).__name__ == "LinearConfig" and cfg.method.views == 3
    with pytest.raises(ConfigError, match="unknown key method.views"):
        vt.load_config(None, ["data.dataset=digits", "method.name=full", "method.views=3"])


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as ei:
        vt.load_config(None, ["data.datset=x", "optim.epochs=abc", "backbone.drop_path=2", "method.name=lorra",
                              "data.train_per_class=5", "data.train_fraction=0.5", "optim.precision=fp64", "bogus.x=1"])
    problems = ei.value.problems
    text = str(ei.value)
    assert len(problems) >= 7, problems
    assert "Did you mean data.dataset?" in text
    assert "optim.epochs='abc' should be an integer" in text
    assert "backbone.drop_path=2.0 must be in [0, 1)" in text
    assert "method.name='lorra'" in text and "Valid:" in text and "linear" in text
    assert "both set" in text
    assert "optim.precision='fp64' is not one of auto, fp32, bf16, fp16" in text
    assert "unknown section 'bogus'" in text


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        vt.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        vt.load_config(bad)


def test_bool_and_none_coercion():
    cfg = vt.load_config(None, ["data.dataset=digits", "data.augment=no", "optim.clip_grad=none", "run.progress=false"])
    assert cfg.data.augment is False and cfg.optim.clip_grad is None and cfg.run.progress is False


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/*.yaml should exist"
    for f in files:
        vt.load_config(f)


def test_deep_merge_shares_nothing_with_its_inputs():
    from visiontune.config import deep_merge

    base, extra = {"a": {"b": 1}}, {"c": {"d": [1]}}
    out = apply_overrides(deep_merge(base, extra), ["a.b=2", "c.d=[3]"])
    assert out == {"a": {"b": 2}, "c": {"d": [3]}}
    assert base == {"a": {"b": 1}} and extra == {"c": {"d": [1]}}
