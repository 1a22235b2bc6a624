"""Config errors: one clear message naming the field, no secret in it, a non-zero exit, and no port opened."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from metrion_addon.config import ConfigError, load_config, parse_config
from tests.conftest import BIN, SHIM, free_port

TOKEN = "sk-metrion-config-test-aaaaaaaaaaaa"
TOKEN2 = "sk-metrion-config-test-bbbbbbbbbbbb"
KEY = "sk-ant-api03-config-test-secret-key"


def account(extra: str = "", tokens: str = f"[{TOKEN}]") -> str:
    return f"accounts:\n  - name: acme\n    tokens: {tokens}\n    anthropic_api_key: {KEY}\n{extra}"


# (label, yaml, env, fragment the message must contain)
CASES: list[tuple[str, str, dict[str, str], str]] = [
    ("bad-yaml", "accounts: [\n  - name: acme\n  tokens: {", {}, "invalid YAML"),
    ("empty", "", {}, "the config file is empty"),
    ("unknown-top-key", "listen_prot: 8080\n" + account(), {}, "field 'listen_prot': unknown key"),
    ("unknown-account-key", account("    tokns: []\n"), {}, "field 'accounts[0].tokns': unknown key"),
    ("repeated-yaml-key", "upstream: http://a\nupstream: http://b\n" + account(), {}, "key 'upstream' appears twice"),
    (
        "duplicate-token",
        account() + f"  - name: other\n    tokens: [{TOKEN}]\n    allow_passthrough: true\n",
        {},
        "field 'accounts[1].tokens[0]': duplicate token (already used at accounts[0].tokens[0])",
    ),
    (
        "duplicate-token-hashed",
        account(tokens=f'[{TOKEN}, "sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}"]'),
        {},
        "field 'accounts[0].tokens[1]': duplicate token",
    ),
    (
        "missing-env",
        account().replace(KEY, "${METRION_CFG_TEST_UNSET}"),
        {},
        "field 'accounts[0].anthropic_api_key': environment variable METRION_CFG_TEST_UNSET is not set",
    ),
    ("port-string", 'listen_port: "8080"\n' + account(), {}, "field 'listen_port': must be an integer, got a string"),
    ("port-range", "listen_port: 70000\n" + account(), {}, "field 'listen_port': must be between 1 and 65535"),
    ("accounts-int", "accounts: 3\n", {}, "field 'accounts': must be a list, got an integer"),
    ("tokens-string", account(tokens=TOKEN), {}, "field 'accounts[0].tokens': must be a list, got a string"),
    ("token-short", account(tokens="[sk-metrion-x]"), {}, "field 'accounts[0].tokens[0]': a proxy token must start"),
    ("token-bad-hash", account(tokens='["sha256:abc"]'), {}, "field 'accounts[0].tokens[0]': a hashed token must be"),
    ("key-int", account().replace(KEY, "12345"), {}, "field 'accounts[0].anthropic_api_key': must be a non-empty"),
    ("passthrough-str", account("    allow_passthrough: maybe\n"), {}, "field 'accounts[0].allow_passthrough'"),
    ("upstream-path", "upstream: https://api.anthropic.com/v1\n" + account(), {}, "field 'upstream': must be a URL"),
    (
        "price-text",
        account() + "pricing:\n  overrides:\n    - {prefix: claude-x, input: cheap, output: 1}\n",
        {},
        "field 'pricing.overrides[0].input': must be a number",
    ),
    ("no-accounts", "listen_port: 8080\n", {}, "field 'accounts': required"),
    ("public-url-slash", "public_url: https://gw.example.com/\n" + account(), {}, "field 'public_url': must be a URL"),
    ("public-url-query", "public_url: https://gw.example.com/p?x=1\n" + account(), {}, "field 'public_url': must be"),
    ("public-url-scheme", "public_url: ftp://gw.example.com\n" + account(), {}, "field 'public_url': must be a URL"),
    ("public-url-markup", 'public_url: "https://gw.example.com/<b>"\n' + account(), {}, "field 'public_url': must"),
]


@pytest.mark.parametrize(("label", "text", "env", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_config_error_names_the_field(tmp_path: Path, label: str, text: str, env: dict[str, str], fragment: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env)
    msg = str(e.value)
    assert fragment in msg
    assert str(path) in msg and "\n" not in msg.strip()
    for secret in (TOKEN, TOKEN2, KEY, hashlib.sha256(TOKEN.encode()).hexdigest(), "sk-metrion-x"):
        assert secret not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_valid_config_and_defaults(tmp_path: Path) -> None:
    config = parse_config(account().replace(KEY, "${K}"), tmp_path / "c.yaml", {"K": KEY})
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)  # loopback unless told otherwise
    assert config.accounts[0].anthropic_api_key == KEY
    assert KEY not in repr(config) and TOKEN not in repr(config)


# --- the command line: exit code, one message, no port ----------------------------------------------

CLI_CASES = ["bad-yaml", "unknown-top-key", "duplicate-token", "missing-env", "port-string", "tokens-string"]


def _cli(tmp: Path, text: str | None, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    port = free_port()
    cfg = tmp / "config.yaml"
    if text is not None:
        cfg.write_text(
            text if "listen_port" in text else text.replace("accounts:", f"listen_port: {port}\naccounts:", 1)
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRION_")}
    cmd = [str(BIN / "metrion-proxy"), "-c", str(cfg), *args, "--", "--set", f"confdir={tmp / 'conf'}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=60), port


@pytest.mark.parametrize("label", [*CLI_CASES, "missing-file"])
def test_cli_config_error_exits_before_listening(tmp_path: Path, label: str) -> None:
    case = {c[0]: c for c in CASES}.get(label)
    r, port = _cli(tmp_path, case[1] if case else None)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metrion-proxy: config error: ")
    assert (case[3] if case else "config file not found") in lines[0]
    assert "listening" not in r.stdout + r.stderr and r.stdout == ""  # mitmdump never started
    for secret in (TOKEN, KEY):
        assert secret not in r.stderr


def test_cli_unusable_database_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r, _ = _cli(tmp_path, "database: file/metrion.db\n" + account())  # a folder that is a file
    assert r.returncode == 2
    assert "field 'database'" in r.stderr and "listening" not in r.stdout + r.stderr


def test_cli_check_accepts_a_valid_config(tmp_path: Path) -> None:
    r, _ = _cli(tmp_path, account(), "--check")
    assert r.returncode == 0 and "is valid (1 account(s))" in r.stdout


def test_plain_mitmdump_with_a_bad_config_exits_nonzero(tmp_path: Path) -> None:
    """Without metrion-proxy, mitmproxy itself refuses to run (it may bind the port for an instant first)."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CASES[3][1])
    cmd = [
        str(BIN / "mitmdump"),
        "-s",
        str(SHIM),
        "--mode",
        f"reverse:http://127.0.0.1:1@127.0.0.1:{free_port()}",
        "--set",
        f"metrion_config={cfg}",
        "--set",
        f"confdir={tmp_path / 'conf'}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    assert "field 'accounts[0].tokns': unknown key" in r.stdout + r.stderr
