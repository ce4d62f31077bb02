"""Key resolution: environment first, `.env` file second, never a value in a message."""

from pathlib import Path

from gateway.providers.keys import Secret, resolve_key


def test_environment_wins_over_file(tmp_path: Path) -> None:
    env_file = tmp_path / "p.env"
    env_file.write_text("MY_KEY=from-file\n")
    key = resolve_key("MY_KEY", str(env_file), {"MY_KEY": "from-env"})
    assert key.secret is not None
    assert key.secret.reveal() == "from-env"
    assert key.source == "environment variable MY_KEY"


def test_file_is_the_fallback_with_dotenv_syntax(tmp_path: Path) -> None:
    env_file = tmp_path / "p.env"
    env_file.write_text('# comment\nexport OTHER=1\nMY_KEY="quoted value"\n')
    key = resolve_key("MY_KEY", str(env_file), {"MY_KEY": "  "})
    assert key.secret is not None
    assert key.secret.reveal() == "quoted value"
    assert str(env_file) in key.source


def test_missing_everywhere_says_where_it_looked(tmp_path: Path) -> None:
    key = resolve_key("MY_KEY", str(tmp_path / "none.env"), {})
    assert key.secret is None
    assert "MY_KEY" in key.source
    assert "does not exist" in key.source
    empty = tmp_path / "empty.env"
    empty.write_text("OTHER=x\n")
    assert "neither" in resolve_key("MY_KEY", str(empty), {}).source
    assert "no env_file" in resolve_key("MY_KEY", "", {}).source


def test_unreadable_file_is_not_an_exception(tmp_path: Path) -> None:
    key = resolve_key("MY_KEY", str(tmp_path), {})  # a directory
    assert key.secret is None


def test_secret_never_shows_in_repr_or_str() -> None:
    secret = Secret("sk-very-secret")
    assert "sk-very-secret" not in repr(secret)
    assert "sk-very-secret" not in str(secret)
    assert "sk-very-secret" not in f"{secret} {secret!r} {[secret]}"
