"""`openft keys create --project NAME` prints only the key, which then works against the API."""

from __future__ import annotations

import openai


def test_keys_create_prints_only_a_working_key(api_server):
    out = api_server.cli("keys", "create", "--project", "cli-keys")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sk-openft-")
    client = openai.OpenAI(base_url=api_server.base_url, api_key=lines[0], max_retries=0)
    assert "openft-tiny-vlm" in [m.id for m in client.models.list()]
    second = api_server.cli("keys", "create", "--project", "cli-keys").stdout.strip()
    assert second != lines[0]  # a new key each time, same project
