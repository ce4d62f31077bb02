"""HTTPS served by the gateway itself, from `tls.certfile` and `tls.keyfile`."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from gateway.config import ConfigError, load
from tests.conftest import StartGateway, make_config
from tests.emulators import OllamaEmulator


async def test_serves_https_with_the_configured_certificate(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    gw = await start_gateway(
        make_config(ollama.url, tls={"certfile": str(certfile), "keyfile": str(keyfile)})
    )
    assert gw.url.startswith("https://")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with httpx.AsyncClient(base_url=gw.url, verify=context) as client:
        with trio.fail_after(10):
            assert (await client.get("/health")).json()["status"] == "ok"
            version = await client.get("/api/version")
            chat = await client.post(
                "/api/chat",
                json={"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
            )
    assert version.json() == {"version": ollama.version}
    assert chat.content.splitlines()[-1].startswith(b'{"model":"llama3"')
    plain = gw.url.replace("https://", "http://")
    async with httpx.AsyncClient(base_url=plain) as client:
        with pytest.raises(httpx.TransportError), trio.fail_after(10):
            await client.get("/health")


def test_half_a_tls_config_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[tls]\ncertfile = "{tmp_path / "cert.pem"}"\n')
    with pytest.raises(ConfigError, match="both certfile and keyfile"):
        load(path, {})
    path.write_text(f'[tls]\ncertfile = "{tmp_path}/a.pem"\nkeyfile = "{tmp_path}/b.pem"\n')
    with pytest.raises(ConfigError, match=r"tls\.certfile: no such file"):
        load(path, {})
