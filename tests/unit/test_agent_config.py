"""The agent's configuration: `${ENV}` substitution, validation messages that name the key, CLI flags."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from maw_agent import ConfigError, parse_config
from maw_agent.cli import main
from maw_agent.config import substitute_env

MINIMAL = "server: sched.example.com:443\nworker: w1\ncredential: maw_agt_secret-value-123\n"


def test_a_minimal_file_gets_working_defaults() -> None:
    config = parse_config(MINIMAL, env={})
    assert config.server == "sched.example.com:443"
    assert config.worker == "workers/w1"
    assert config.capacity_slots == 1
    assert config.tools == ["shell"]
    assert config.tls is False
    assert config.shutdown_grace_s == 30.0
    assert config.cancel_grace_s == 10.0
    assert config.read_credential() == "maw_agt_secret-value-123"


def test_env_variables_and_defaults_are_substituted_in_values() -> None:
    text = (
        "server: ${HOST}:${PORT:-7443}\n"
        "worker: ${WORKER:-fallback}\n"
        "credential: ${CRED}\n"
        "capacity_slots: ${SLOTS:-4}\n"
        "labels: {zone: '${ZONE:-}', literal: 'cost $$5'}\n"
    )
    config = parse_config(text, env={"HOST": "10.0.0.1", "CRED": "c-1", "WORKER": ""})
    assert config.server == "10.0.0.1:7443"
    assert config.worker == "workers/fallback"  # empty counts as unset for :-
    assert config.capacity_slots == 4
    assert config.labels == {"zone": "", "literal": "cost $5"}
    assert config.read_credential() == "c-1"


def test_a_missing_variable_is_an_error_naming_the_key_and_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("server: h:1\nworker: w\nlabels:\n  zone: ${NOT_SET_ANYWHERE}\ncredential: x\n", env={})
    assert "labels.zone" in str(err.value)
    assert "NOT_SET_ANYWHERE" in str(err.value)


def test_a_substituted_value_is_never_parsed_as_yaml() -> None:
    config = parse_config(MINIMAL + "labels: {note: '${NOTE}'}\n", env={"NOTE": "a: [b, c]\nx: y"})
    assert config.labels == {"note": "a: [b, c]\nx: y"}


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("capacity_slots: 0\n", "capacity_slots"),
        ("capacity_slots: lots\n", "capacity_slots"),
        ("tools: [shell, teleport]\n", "tools"),
        ("log_level: LOUD\n", "log_level"),
        ("colour: blue\n", "colour"),
        ("heartbeat_interval_s: -1\n", "heartbeat_interval_s"),
        ("privacy_level: secret\n", "privacy_level"),
    ],
)
def test_invalid_values_are_reported_with_their_key(extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(MINIMAL + extra, env={})
    assert f"\n  {key}:" in str(err.value)


@pytest.mark.parametrize("server", ["no-port", "host:", "host:99999", "a b:1", ""])
def test_the_server_must_be_host_and_port(server: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"server: '{server}'\nworker: w\ncredential: c\n", env={})
    assert "server:" in str(err.value)


def test_exactly_one_credential_source_is_required() -> None:
    with pytest.raises(ConfigError, match="exactly one of credential and credential_file"):
        parse_config("server: h:1\nworker: w\n", env={})
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config("server: h:1\nworker: w\ncredential: a\ncredential_file: /x\n", env={})


def test_the_credential_is_read_from_its_file(tmp_path: Path) -> None:
    path = tmp_path / "cred"
    path.write_text("maw_agt_from-file-000000\n")
    config = parse_config(f"server: h:1\nworker: w\ncredential_file: {path}\n", env={})
    assert config.read_credential() == "maw_agt_from-file-000000"
    path.write_text("")
    with pytest.raises(ConfigError, match="credential_file"):
        config.read_credential()


def test_the_credential_never_shows_in_the_models_text_or_the_redacted_dump() -> None:
    config = parse_config(MINIMAL, env={})
    assert "secret-value" not in repr(config)
    assert "secret-value" not in str(config.redacted())


def test_yaml_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config("- a\n- b\n", env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("server: [unclosed\n", env={})


def test_cli_flags_override_the_file_and_print_config_masks_the_credential(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(MINIMAL + "labels: {a: '1'}\ncapacity_slots: 2\n")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(
            [
                "run",
                "--config",
                str(path),
                "--server",
                "other:9000",
                "--capacity-slots",
                "8",
                "--label",
                "b=2",
                "--tool",
                "test",
                "--no-tls",
                "--print-config",
            ]
        )
    assert code == 0
    printed = yaml.safe_load(out.getvalue())
    assert printed["server"] == "other:9000"
    assert printed["capacity_slots"] == 8
    assert printed["labels"] == {"a": "1", "b": "2"}
    assert printed["tools"] == ["test"]
    assert printed["credential"] == "[REDACTED]"
    assert "secret-value" not in out.getvalue()


def test_a_credential_file_flag_replaces_the_files_credential(tmp_path: Path) -> None:
    cred = tmp_path / "cred"
    cred.write_text("maw_agt_flag-credential-0000")
    path = tmp_path / "agent.yaml"
    path.write_text(MINIMAL)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["run", "-c", str(path), "--credential-file", str(cred), "--print-config"]) == 0
    printed = yaml.safe_load(out.getvalue())
    assert printed["credential"] is None
    assert printed["credential_file"] == str(cred)


def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(MINIMAL + "capacity_slots: -3\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "capacity_slots" in capsys.readouterr().err


@given(st.text().filter(lambda text: "$" not in text))
def test_strings_without_a_dollar_are_left_alone(text: str) -> None:
    assert substitute_env({"k": [text]}, {}) == {"k": [text]}


@given(
    st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True), st.text(alphabet=st.characters(exclude_characters="}$"))
)
def test_a_default_applies_exactly_when_the_variable_is_unset(name: str, default: str) -> None:
    template = f"${{{name}:-{default}}}"
    assert substitute_env(template, {}) == default
    assert substitute_env(template, {name: "set"}) == "set"
