from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedprune.common.configkit import ConfigError, in_range, load, one_of, render_example, setting


@dataclass(frozen=True)
class Broker:
    """Where the MQTT broker is."""

    url: str = setting("mqtt://127.0.0.1:1883", "broker URL", check=lambda v: None if "://" in v else "mqtt://host:port")
    password: str = setting("", "password", secret=True, check=lambda v: None if len(v) < 64 else "under 64 chars")
    ca_file: Path | None = setting(None, "CA bundle")


@dataclass(frozen=True)
class Rounds:
    """Round policy."""

    total: int = setting(10, "rounds to run", check=in_range(1, 10_000))
    fraction: float = setting(0.5, "fraction selected", check=in_range(0.0, 1.0))
    policy: str = setting("close", "on missed quorum", check=one_of("close", "retry"))
    verbose: bool = setting(False, "chatty logs")
    devices: tuple[str, ...] = setting((), "allowed devices")


@dataclass(frozen=True)
class Config:
    broker: Broker
    rounds: Rounds


def test_defaults_toml_env_and_flags_layer_in_that_order(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[rounds]\ntotal = 20\npolicy = "retry"\n[broker]\nca_file = "/etc/ca.pem"\n')
    config = load(
        Config,
        toml_path=path,
        env={"FP_ROUNDS_TOTAL": "30", "FP_ROUNDS_VERBOSE": "yes", "OTHER": "x"},
        env_prefix="FP_",
        overrides={"rounds.total": "40", "rounds.devices": '["a", "b"]'},
    )
    assert config.rounds.total == 40
    assert config.rounds.policy == "retry"
    assert config.rounds.verbose is True
    assert config.rounds.devices == ("a", "b")
    assert config.broker.ca_file == Path("/etc/ca.pem")
    assert config.broker.url == "mqtt://127.0.0.1:1883"


@pytest.mark.parametrize(
    "toml,expected",
    [
        ("[rounds]\ntotal = 0\n", r"\[rounds\] total 0: expected a number in \[1, 10000\]"),
        ("[rounds]\ntotal = 'x'\n", r"\[rounds\] total 'x': expected an integer"),
        ("[rounds]\npolicy = 'wait'\n", r"\[rounds\] policy 'wait': expected one of 'close', 'retry'"),
        ("[rounds]\ntotl = 3\n", r"\[rounds\] totl: unknown key"),
        ("[nope]\nx = 1\n", r"unknown section \[nope\]"),
        ("[broker]\nurl = 'mqtt//x'\n", r"\[broker\] url 'mqtt//x': expected mqtt://host:port"),
        ("[rounds\n", r"not valid TOML"),
    ],
)
def test_a_wrong_value_names_the_key_and_what_is_expected(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=expected):
        load(Config, toml_path=path)


def test_secret_values_are_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load(Config, overrides={"broker.password": "s3cret" * 20})
    assert "s3cret" not in str(info.value)


def test_missing_file_and_bad_flag_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(Config, toml_path=tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="section.key"):
        load(Config, overrides={"total": "3"})
    with pytest.raises(ConfigError, match="no section matches"):
        load(Config, env={"FP_BOGUS": "1"}, env_prefix="FP_")


def test_rendered_example_loads_back_to_the_defaults(tmp_path: Path) -> None:
    text = render_example(Config, "example")
    assert "# rounds to run" in text and "[broker]" in text
    path = tmp_path / "example.toml"
    path.write_text(text)
    assert load(Config, toml_path=path) == load(Config)


@dataclass(frozen=True)
class Step:
    size: int = 1
    decay: float = 0.0


@dataclass(frozen=True)
class Plan:
    name: str = setting("plan", "a name")
    step: Step = field(default_factory=lambda: Step(size=16, decay=0.5))


@dataclass(frozen=True)
class Nested:
    plan: Plan


def test_a_nested_table_overrides_only_its_keys_and_keeps_the_parents_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[plan.step]\ndecay = 0.25\n")
    assert load(Nested, toml_path=path).plan.step == Step(size=16, decay=0.25)
    assert load(Nested).plan.step == Step(size=16, decay=0.5)
