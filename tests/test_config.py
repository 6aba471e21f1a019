"""Config loading: YAML + dotted overrides into typed sections, with named errors."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megagym.config import ConfigError, build, load
from megagym.config.schema import RunConfig


@dataclass
class Inner:
    temperature: float = 1.0
    top_k: Optional[int] = None
    mode: Literal["sync", "async"] = "sync"
    urls: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 1
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\ninner:\n  temperature: 0.7\n")
    cfg = load(Outer, p, ["steps=5", "inner.urls=[a, b]", "inner.mode=async", "inner.top_k=3"])
    assert cfg.name == "demo" and cfg.steps == 5
    assert cfg.inner.temperature == pytest.approx(0.7)
    assert cfg.inner.urls == ["a", "b"] and cfg.inner.mode == "async" and cfg.inner.top_k == 3


def test_unknown_key_names_key_and_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'inner.temprature'; did you mean 'temperature'"):
        build(Outer, {"inner": {"temprature": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'stepz'; did you mean 'steps'"):
        load(Outer, None, ["stepz=3"])


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match=r"steps: expected an integer"):
        build(Outer, {"steps": "many"})
    with pytest.raises(ConfigError, match=r"inner.mode: 'fast' is not one of"):
        build(Outer, {"inner": {"mode": "fast"}})
    with pytest.raises(ConfigError, match=r"inner: expected a section"):
        build(Outer, {"inner": 3})


def test_server_settings_are_checked_before_anything_starts():
    """servers.settings pass through to `megagym serve`: a key or type it would refuse is refused at load."""
    with pytest.raises(ConfigError, match=r"unknown key 'servers.settings.kv_cache_gb'; did you mean 'kv_cache_gib'"):
        load(RunConfig, None, ["servers.settings.kv_cache_gb=1"])
    with pytest.raises(ConfigError, match=r"servers.settings.seed: expected an integer, got 'abc'"):
        load(RunConfig, None, ['servers.settings.seed="abc"'])
    with pytest.raises(ConfigError, match=r"servers.settings.train_sampling.top_p: expected a number"):
        load(RunConfig, None, ['servers.settings.train_sampling.top_p="x"'])
    cfg = load(RunConfig, None, ["servers.settings.request_seeds=true", "servers.settings.train_sampling.top_p=1.0"])
    assert cfg.servers.settings["request_seeds"] is True


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load(Outer, None, ["steps"])


def test_run_config_defaults():
    cfg = build(RunConfig, {"run": {"name": "t"}})
    assert cfg.run.name == "t"


def test_server_api_key_is_the_single_source_for_gym_and_never_written():
    from megagym.config import ConfigError, load, redacted, to_dict
    from megagym.config.schema import RunConfig

    cfg = load(RunConfig, None, ["servers.settings.api_key=s3cret"])
    assert cfg.env.policy_api_key == "s3cret"  # Gym's model proxy sends the servers' key
    shown = redacted(to_dict(cfg))
    assert shown["servers"]["settings"]["api_key"] == shown["env"]["policy_api_key"] == "<redacted>"
    assert "s3cret" not in repr(shown)
    assert redacted(to_dict(load(RunConfig)))["env"]["policy_api_key"] == "dummy"
    with pytest.raises(ConfigError, match="policy_api_key"):
        load(RunConfig, None, ["servers.settings.api_key=a", "env.policy_api_key=b"])
