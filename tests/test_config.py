"""Config: dicts and JSON round-trip; unknown keys and values are errors that list the fix."""

from __future__ import annotations

import dataclasses

import pytest

import diffopt.config
from diffopt import CleanupConfig, Config, ConfigError
from diffopt.config import config_sections, register_section


def test_round_trips_through_dict_and_json(tmp_path):
    config = Config(inner="eager", strict=True, cleanup=CleanupConfig(squeeze=False))
    assert Config.from_dict(config.to_dict()) == config
    config.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == config


def test_nested_dicts_and_none_disable():
    config = Config.from_dict({"cleanup": {"dropout": False}})
    assert config.cleanup == CleanupConfig(dropout=False)
    assert Config.from_dict({"cleanup": None}).cleanup is None


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"\['innr'\].*valid keys are: \['cache', 'cleanup', 'fold', 'inner'"
    ):
        Config.from_dict({"innr": "eager"})
    with pytest.raises(ConfigError, match=r"options\.cleanup.*'dropout'"):
        Config.from_dict({"cleanup": {"drop": True}})


def test_bad_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"must be a dict or a diffopt\.Config"):
        Config.coerce(["eager"])
    (tmp_path / "bad.json").write_text("{inner: eager")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.load(tmp_path / "bad.json")


def test_pass_sections_must_be_their_config_or_a_preset():
    with pytest.raises(ConfigError, match="cache must be a CacheConfig"):
        Config.from_dict({"cache": 5})
    with pytest.raises(ConfigError, match=r"quant=.* is not a known preset"):
        Config.from_dict({"quant": "int3"})


def test_constructor_takes_a_dict_per_pass_section():
    from diffopt.config import QuantConfig

    config = Config(quant={"rotation": "none", "min_sqnr": 0.0})
    assert config.quant == QuantConfig(rotation="none", min_sqnr=0.0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rotaton'\] in quant"):
        Config(quant={"rotaton": "none"})


@dataclasses.dataclass
class ExtraConfig:
    """The settings of a pass from outside diffopt."""

    level: int = 1


def test_registered_sections_work_like_the_built_in_ones(monkeypatch, tmp_path):
    monkeypatch.setattr(diffopt.config, "_SECTIONS", {})  # registrations end with the test
    register_section("extra", ExtraConfig)
    register_section("extra", ExtraConfig)  # the same kind again: nothing happens
    assert config_sections() == {
        "cleanup": CleanupConfig,
        "fold": diffopt.config.FoldConfig,
        "rotary": diffopt.config.RealRotaryConfig,
        "cache": diffopt.config.CacheConfig,
        "quant": diffopt.config.QuantConfig,
        "extra": ExtraConfig,
    }
    config = Config(inner="eager", extra={"level": 2})
    assert config.extra == ExtraConfig(level=2) and Config().extra is None
    assert dataclasses.replace(config, inner="aot_eager").extra == ExtraConfig(level=2)
    config.extra = ExtraConfig(level=3)
    assert config.to_dict()["extra"] == {"level": 3} and "sections" not in config.to_dict()
    config.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == config
    assert Config.from_dict({"extra": None}) == Config()

    with pytest.raises(ConfigError, match=r"\['extr'\] in Config; valid keys are: .*'extra'"):
        Config(extr={})
    with pytest.raises(ConfigError, match=r"\['nope'\] in Config\.sections"):
        Config(sections={"nope": None})
    with pytest.raises(ConfigError, match="'extra' already holds ExtraConfig"):
        register_section("extra", CleanupConfig)
    with pytest.raises(ConfigError, match="'cache' already holds CacheConfig"):
        register_section("cache", ExtraConfig)
    with pytest.raises(ConfigError, match="'inner' cannot name a config section"):
        register_section("inner", ExtraConfig)
    with pytest.raises(ConfigError, match="must be a dataclass"):
        register_section("plain", dict)
