"""`openft keys create --project NAME` prints only the key, which then works against the API."""

from __future__ import annotations

import openai
import pytest
from typer.testing import CliRunner, Result

from openft.cli.main import app
from tests.conftest import Server


def cli(server: Server, *args: str) -> Result:
    """``openft ARGS`` on the server's home, run in process: the same command and output, without
    an interpreter start-up per call (eleven of them took a minute on two busy cores)."""
    return CliRunner().invoke(app, list(args), env=server.env)


def test_keys_create_prints_only_a_working_key(api_server):
    out = cli(api_server, "keys", "create", "--project", "cli-keys")
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sk-openft-")
    client = openai.OpenAI(base_url=api_server.base_url, api_key=lines[0], max_retries=0)
    assert "openft-tiny-vlm" in [m.id for m in client.models.list()]
    second = cli(api_server, "keys", "create", "--project", "cli-keys").stdout.strip()
    assert second != lines[0]  # a new key each time, same project


def test_keys_list_shows_prefixes_and_revoke_turns_a_key_away(api_server):
    import json

    first = cli(api_server, "keys", "create", "--project", "cli-revoke", "--json")
    assert first.exit_code == 0, first.stderr
    made = json.loads(first.stdout)
    key, prefix = made["key"], made["prefix"]
    assert prefix == key[:14] and made["project"] == "cli-revoke"
    other = cli(api_server, "keys", "create", "--project", "cli-revoke").stdout.strip()

    listed = json.loads(cli(api_server, "keys", "list", "--project", "cli-revoke", "--json").stdout)
    assert [k["prefix"] for k in listed] == [key[:14], other[:14]]
    assert all(k["revoked"] is False and k["project"] == "cli-revoke" for k in listed)
    text = cli(api_server, "keys", "list", "--project", "cli-revoke")
    assert key[:14] + "…" in text.stdout and key not in text.stdout  # never the key itself

    client = openai.OpenAI(base_url=api_server.base_url, api_key=key, max_retries=0)
    client.models.list()
    out = cli(api_server, "keys", "revoke", str(listed[0]["id"]), "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    # the other key of the project still works; its listing says which one is revoked
    openai.OpenAI(base_url=api_server.base_url, api_key=other, max_retries=0).models.list()
    after = json.loads(cli(api_server, "keys", "list", "--project", "cli-revoke", "--json").stdout)
    assert [k["revoked"] for k in after] == [True, False]

    by_full_key = cli(api_server, "keys", "revoke", other)
    assert by_full_key.exit_code == 0 and "revoked key" in by_full_key.stdout
    unknown = cli(api_server, "keys", "revoke", "sk-openft-nope")
    assert unknown.exit_code == 1 and "openft keys list" in unknown.stderr
    ambiguous = cli(api_server, "keys", "revoke", "sk-openft-")
    assert ambiguous.exit_code == 1 and "revoke by number" in ambiguous.stderr
