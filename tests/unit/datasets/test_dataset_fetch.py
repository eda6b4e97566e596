"""Image fetching against a loopback server: codes, caps, redirects and the SSRF guard."""

import ssl

import pytest

from openft.datasets.fetch import MAX_REDIRECTS, FetchError, check_host, fetch_url, make_client
from openft.datasets.images import MAX_IMAGE_BYTES, ImageRejected, fetch_image_bytes

from .conftest import png_bytes


def fetch_code(url: str, **kw) -> tuple[str, str]:
    with pytest.raises(ImageRejected) as e:
        fetch_image_bytes(url, **kw)
    return e.value.code, e.value.message


def test_good_image(image_server: str) -> None:
    assert fetch_image_bytes(f"{image_server}/good.png", allow_private_networks=True) == png_bytes()


def test_default_refuses_loopback_and_says_why(image_server: str) -> None:
    code, message = fetch_code(f"{image_server}/good.png")
    assert code == "inaccessible_url"
    assert "loopback" in message and "refused" in message


@pytest.mark.parametrize(
    "host, why",
    [
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("0.0.0.0", "non-public"),
        ("100.100.100.200", "non-public"),
        ("::ffff:127.0.0.1", "loopback"),
    ],
)
def test_non_public_addresses_are_refused(host: str, why: str) -> None:
    with pytest.raises(FetchError) as e:
        check_host(host, 80)
    assert why in e.value.message


def test_missing_image_is_inaccessible(image_server: str) -> None:
    code, message = fetch_code(f"{image_server}/missing.png", allow_private_networks=True)
    assert code == "inaccessible_url" and "404" in message


def test_slow_server_times_out(image_server: str) -> None:
    code, message = fetch_code(f"{image_server}/slow.png", allow_private_networks=True, timeout=0.5)
    assert code == "inaccessible_url" and "0.5 s" in message


def test_huge_body_is_cut_while_streaming(image_server: str) -> None:
    code, message = fetch_code(f"{image_server}/huge.png", allow_private_networks=True)
    assert code == "image_too_large" and "more than" in message
    code, _ = fetch_code(f"{image_server}/declared-huge.png", allow_private_networks=True)
    assert code == "image_too_large"


def test_redirects_are_followed_up_to_the_limit(image_server: str) -> None:
    ok = fetch_image_bytes(f"{image_server}/redirect/{MAX_REDIRECTS}", allow_private_networks=True)
    assert ok == png_bytes()
    code, message = fetch_code(f"{image_server}/redirect/{MAX_REDIRECTS + 1}", allow_private_networks=True)
    assert code == "inaccessible_url" and "redirects" in message


def test_each_redirect_target_is_rechecked(monkeypatch, image_server: str) -> None:
    """A public URL redirecting to loopback is refused at the hop, not followed."""
    import openft.datasets.fetch as fetch

    checked: list[str] = []

    def fake_check(host: str, port: int) -> None:
        checked.append(host)
        raise FetchError("inaccessible_url", f"{host} refused")

    monkeypatch.setattr(fetch, "check_host", fake_check)
    with pytest.raises(FetchError):
        fetch_url(f"{image_server}/redirect/1", max_bytes=MAX_IMAGE_BYTES)
    assert checked == ["127.0.0.1"]


def test_bad_urls() -> None:
    for url in ("http://", "http://exa mple.com/x.png", "gopher://x/y", "http://host:99999/x"):
        code, _ = fetch_code(url)
        assert code == "inaccessible_url"


def test_fetch_clients_verify_tls_through_one_shared_context() -> None:
    """Certificates and host names are checked; the context (its CA bundle loaded once) is shared,
    so validating a file costs no TLS set-up when it has no URL to fetch."""
    a, b = make_client(1.0), make_client(2.0)
    ctx = a._transport._pool._ssl_context  # httpx's transport -> httpcore's pool
    assert ctx is b._transport._pool._ssl_context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
