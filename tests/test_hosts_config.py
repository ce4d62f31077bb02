"""`[ollama.hosts.<name>]`: inheritance from `[ollama]`, validation, check-config (ADR 0020)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main, render_config
from gateway.config import DEFAULT_HOST, ConfigError, host_specs, load

TWO_HOSTS = """
[ollama]
poll_interval_s = 5
first_byte_timeout_s = 100
[gate]
capacity = 3
[ollama.hosts.mac]
url = "http://mac.lan:11434"
token_env = "MAC_OLLAMA_TOKEN"
capacity = 1
embed_model = "nomic-embed-text"
[ollama.hosts.tower]
url = "http://user:pw-secret-1@tower.lan:11434"
first_byte_timeout_s = 20
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_each_host_inherits_what_it_does_not_set(tmp_path: Path) -> None:
    mac, tower = host_specs(load(write(tmp_path, TWO_HOSTS), {}))
    assert (mac.name, tower.name) == ("mac", "tower")
    assert mac.ollama.url == "http://mac.lan:11434"
    assert mac.ollama.token_env == "MAC_OLLAMA_TOKEN"
    assert (mac.capacity, tower.capacity) == (1, 3)  # tower: [gate] capacity
    assert (mac.ollama.embed_model, tower.ollama.embed_model) == ("nomic-embed-text", "")
    assert (mac.ollama.poll_interval_s, tower.ollama.poll_interval_s) == (5.0, 5.0)
    assert (mac.ollama.first_byte_timeout_s, tower.ollama.first_byte_timeout_s) == (100.0, 20.0)
    assert tower.ollama.token_env == "GATEWAY_OLLAMA_TOKEN"
    assert not mac.implicit
    assert not mac.ollama.hosts


def test_no_hosts_table_is_one_host_from_ollama_url_and_its_env_override() -> None:
    [only] = host_specs(load(None, {"GATEWAY_OLLAMA_URL": "http://gpu.lan:11434"}))
    assert (only.name, only.implicit, only.ollama.url) == (
        DEFAULT_HOST,
        True,
        "http://gpu.lan:11434",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[ollama.hosts.a]\nurl = "http://gpu.lan:11434/"\n'
            '[ollama.hosts.b]\nurl = "http://GPU.lan:11434"\n',
            "ollama.hosts.b.url: the same host as ollama.hosts.a",
        ),
        (
            '[ollama.hosts.a]\nurl = "http://gpu.lan"\n[ollama.hosts.b]\nurl = "http://gpu.lan:80"\n',
            "the same host as ollama.hosts.a",
        ),
        ('[ollama.hosts."bad name"]\nurl = "http://gpu.lan"\n', "ollama.hosts.'bad name'"),
        ('[ollama.hosts.a]\nurl = "ftp://gpu.lan"\n', "ollama.hosts.a.url: expected an http://"),
        ("[ollama.hosts.a]\ncapacity = 1\n", "Object missing required field `url`"),
        ('[ollama.hosts.a]\nurl = "http://gpu.lan"\ncolour = 1\n', "ollama.hosts.a.colour"),
        ('[ollama.hosts.a]\nurl = "http://gpu.lan"\ncapacity = 0\n', "capacity"),
    ],
)
def test_bad_hosts_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load(write(tmp_path, text), {})
    assert message in str(caught.value)


def test_check_config_redacts_host_urls_and_names_each_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, TWO_HOSTS)
    text = render_config(load(path, {}), {"MAC_OLLAMA_TOKEN": "mac-token-2"})
    assert "pw-secret-1" not in text
    assert "mac-token-2" not in text
    assert "http://user:***@tower.lan:11434" in text
    assert "[ollama.hosts.mac]" in text
    assert "# ollama token of host mac: set (MAC_OLLAMA_TOKEN)" in text
    assert "# GPU hosts: mac, tower (ollama.url is not used" in text
    assert "# ollama token of host tower: not set (GATEWAY_OLLAMA_TOKEN)" in text
    assert main(["check-config", "--config", str(path)]) == 0
    # What check-config prints loads again to the same hosts.
    again = write(tmp_path, capsys.readouterr().out.replace("***", "pw"))
    assert [h.name for h in host_specs(load(again, {}))] == ["mac", "tower"]
