"""Models API: base models always listed; unknown ids 404; base models cannot be deleted."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.openapi_schema import validate_against


def test_list_and_retrieve_base_model(api_server):
    c = api_server.client("models")
    ids = [m.id for m in c.models.list()]
    assert "openft-tiny-vlm" in ids
    raw = httpx.get(api_server.base_url + "/models", headers={"Authorization": f"Bearer {c.api_key}"}).json()
    validate_against("ListModelsResponse", raw)
    m = c.models.retrieve("openft-tiny-vlm")
    assert m.id == "openft-tiny-vlm" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("ft:openft-tiny-vlm:someone:x:abcdefgh")
    with pytest.raises(openai.BadRequestError):
        c.models.delete("openft-tiny-vlm")
