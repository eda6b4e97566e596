"""The dashboard page and its assets, served by the API process."""

from __future__ import annotations

from pathlib import Path

import httpx

import openft.web

STATIC = Path(openft.web.__file__).parent / "static"


def test_dashboard_page_and_assets_are_served(api_server):
    page = httpx.get(api_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, media in (("app.js", "text/javascript"), ("app.css", "text/css")):
        r = httpx.get(f"{api_server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media)
        assert r.content == (STATIC / name).read_bytes()


def test_only_files_of_the_static_folder_are_served(api_server):
    for path in ("/static/nope.js", "/static/../router.py", "/static/%2e%2e/router.py"):
        assert httpx.get(api_server.url + path).status_code == 404
