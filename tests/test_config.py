"""Configuration: defaults, TOML, environment overrides, errors that name the key, redaction."""

from pathlib import Path

import pytest

from gateway.cli import main, render_config
from gateway.config import Config, ConfigError, from_mapping, load
from gateway.record import RequestRecord


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_defaults_serve_with_no_file() -> None:
    config = load(None, {})
    assert config.bind == "127.0.0.1:11435"
    assert config.bind_host_port() == ("127.0.0.1", 11435)
    assert config.ollama.url == "http://127.0.0.1:11434"
    assert config.gate.capacity == 1
    assert config.gate.max_queue == 64
    assert config.providers.ollama_cloud.base_url == "https://ollama.com"
    assert config.providers.kimi.base_url == "https://api.kimi.com/coding/v1"


def test_file_values_and_env_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
bind = "0.0.0.0:9000"
[ollama]
url = "http://gpu.lan:11434"
poll_interval_s = 10
embed_model = "nomic-embed-text"
[gate]
max_queue = 5
[providers.openrouter]
key_env = "MY_OR_KEY"
""",
    )
    config = load(path, {"GATEWAY_BIND": "127.0.0.1:1234", "GATEWAY_GATE_MAX_QUEUE": "7"})
    assert config.bind == "127.0.0.1:1234"
    assert config.ollama.url == "http://gpu.lan:11434"
    assert config.ollama.poll_interval_s == 10.0
    assert config.ollama.embed_model == "nomic-embed-text"
    assert config.gate.max_queue == 7
    assert config.providers.openrouter.key_env == "MY_OR_KEY"
    assert config.providers.openrouter.base_url == "https://openrouter.ai/api/v1"


def test_config_file_from_gateway_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[gate]\ncapacity = 2\n")
    assert load(None, {"GATEWAY_CONFIG": str(path)}).gate.capacity == 2


def test_env_override_of_nested_provider_and_ollama_url() -> None:
    config = load(
        None,
        {
            "GATEWAY_OLLAMA_URL": "http://10.0.0.5:11434",
            "GATEWAY_PROVIDERS_KIMI_TIMEOUT_S": "12.5",
            "GATEWAY_OLLAMA_ALLOW_MANAGEMENT": "true",
        },
    )
    assert config.ollama.url == "http://10.0.0.5:11434"
    assert config.providers.kimi.timeout_s == 12.5
    assert config.ollama.allow_management is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour = 1\n", "unknown key 'colour'"),
        ("[ollama]\nurll = 'x'\n", "unknown key 'ollama.urll'"),
        ("[providers.kimi]\napi_key = 'x'\n", "unknown key 'providers.kimi.api_key'"),
        ("[gate]\ncapacity = 'one'\n", "gate.capacity"),
        ("[gate]\ncapacity = 0\n", "gate.capacity"),
        ("[ollama]\npoll_interval_s = -1\n", "ollama.poll_interval_s"),
        ("bind = 'nonsense'\n", "bind"),
        ("[ollama]\nurl = 'ftp://x'\n", "ollama.url"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load(path, {})
    assert expected in str(error.value)
    assert str(path) in str(error.value) or "bind" in expected


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_GATE_CAPACITY"):
        load(None, {"GATEWAY_GATE_CAPACITY": "lots"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml", {})


def test_render_redacts_every_secret(tmp_path: Path) -> None:
    env_file = tmp_path / "kimi.env"
    env_file.write_text("KIMI_API_KEY=kimi-file-secret-123\n")
    path = write(
        tmp_path,
        f"""
[ollama]
url = "http://user:url-password-456@gpu.lan:11434"
[providers.kimi]
env_file = "{env_file}"
""",
    )
    environ = {
        "OPENROUTER_API_KEY": "or-env-secret-789",
        "GATEWAY_OLLAMA_TOKEN": "target-token-000",
    }
    text = render_config(load(path, environ), environ)
    for secret in (
        "kimi-file-secret-123",
        "url-password-456",
        "or-env-secret-789",
        "target-token-000",
    ):
        assert secret not in text
    assert "openrouter: registered, key from environment variable OPENROUTER_API_KEY" in text
    assert f"kimi: registered, key from {env_file}" in text
    assert "ollama_cloud: not registered" in text
    assert "ollama token: set" in text
    assert "http://user:***@gpu.lan:11434" in text


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 0
    assert 'bind = "127.0.0.1:11435"' in capsys.readouterr().out
    bad = write(tmp_path, "[gate]\nmax_qeue = 3\n")
    assert main(["check-config", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'gate.max_qeue'" in err
    assert str(bad) in err


def test_rendered_config_is_valid_toml_that_loads_back(tmp_path: Path) -> None:
    config = load(None, {})
    path = write(tmp_path, render_config(config, {}))
    assert load(path, {}) == config
    assert isinstance(config, Config)


def test_the_example_config_lists_every_key_at_its_default() -> None:
    """deploy/gateway.toml documents the defaults: it must load to exactly them, and
    name every key (so a new key cannot be left out of the operator's example)."""
    import tomllib

    example = Path(__file__).parent.parent / "deploy" / "gateway.toml"
    assert load(example, {}) == load(None, {})
    written = tomllib.loads(example.read_text())

    def keys(table: dict[str, object], prefix: str = "") -> set[str]:
        found: set[str] = set()
        for key, value in table.items():
            found |= keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
        return found

    import msgspec

    assert keys(written) == keys(msgspec.to_builtins(load(None, {})))


def test_clients_table_keyed_by_name_with_defaults_for_the_rest() -> None:
    config = from_mapping({"clients": {"alice": {"priority": "interactive", "weight": 2.0}}})
    assert config.client("alice").priority == "interactive"
    assert config.client("alice").weight == 2.0
    assert config.client("bob").priority == "normal"
    with pytest.raises(ConfigError, match="prio"):
        from_mapping({"clients": {"alice": {"prio": "high"}}})
    with pytest.raises(ConfigError):
        from_mapping({"clients": {"alice": {"priority": "urgent"}}})


def test_record_who_is_the_token_name_else_the_address() -> None:
    record = RequestRecord("id", "POST", "/api/chat", "10.0.0.7:51234", 0.0)
    assert record.who == "10.0.0.7"
    record.client_name = "alice"
    assert record.who == "alice"
    assert RequestRecord("id", "POST", "/", "::1:5", 0.0).who == "::1"
