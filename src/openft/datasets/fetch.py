"""Fetching images over HTTP(S) for validation, defensively.

A training file is user input, and its URLs are requests our server makes on the user's
behalf, so every fetch is guarded against server-side request forgery (SSRF): only http and
https; the host is resolved and refused if any address is loopback, private, link-local
(that includes the cloud metadata endpoint 169.254.169.254), or otherwise not globally
routable, unless ``allow_private_networks``; redirects are followed by hand, at most
``MAX_REDIRECTS``, each target re-checked; after connecting, the peer address is checked
again (a DNS answer that changed in between, "DNS rebinding", is caught there). The size
cap is enforced while streaming, so a huge or endless body costs at most ``max_bytes``.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

import httpx

MAX_REDIRECTS = 3
USER_AGENT = "openft-validator/1 (+image fetch for fine-tuning validation)"


class FetchError(Exception):
    """A URL could not be used; ``code`` is ``inaccessible_url`` or ``image_too_large``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why this address is off limits, or None if it is a public one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata endpoints live there)"
    if ip.is_unspecified or ip.is_reserved:
        return "a reserved, non-public address"
    if ip.is_private:
        return "a private-network address"
    if not ip.is_global or ip.is_multicast:
        return "a reserved, non-public address"
    return None


def check_host(host: str, port: int) -> None:
    """Resolve ``host`` and refuse it if any address is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError("inaccessible_url", f"the host {host!r} could not be resolved ({e})") from e
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        why = _refusal(ip)
        if why is not None:
            raise FetchError(
                "inaccessible_url",
                f"the host {host!r} resolves to {ip}, {why}, which is refused for security; "
                "use a publicly reachable URL or a data: URL",
            )


def _check_url(url: str, allow_private_networks: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError("inaccessible_url", f"unsupported URL scheme {parts.scheme!r}; use https")
    if not parts.hostname:
        raise FetchError("inaccessible_url", "the URL has no host; use a full https:// URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise FetchError("inaccessible_url", f"the URL has an invalid port ({e})") from e
    if not allow_private_networks:
        check_host(parts.hostname, port)


def _check_peer(response: httpx.Response, allow_private_networks: bool) -> None:
    if allow_private_networks:
        return
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("server_addr") if stream is not None else None
    if addr:
        why = _refusal(ipaddress.ip_address(str(addr[0]).split("%")[0]))
        if why is not None:
            raise FetchError(
                "inaccessible_url",
                f"the server's address {addr[0]} is {why}, which is refused for security",
            )


def fetch_url(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 10.0,
    allow_private_networks: bool = False,
    client: httpx.Client | None = None,
) -> bytes:
    """GET ``url`` and return the body; raises ``FetchError`` with a user-facing message.

    ``timeout`` bounds each network wait and also the whole fetch, redirects included, so a
    server that trickles bytes cannot hold a worker thread forever.
    """
    own = client is None
    if client is None:
        client = make_client(timeout)
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            _check_url(url, allow_private_networks)
            try:
                with client.stream("GET", url, headers={"user-agent": USER_AGENT}) as response:
                    _check_peer(response, allow_private_networks)
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise FetchError("inaccessible_url", "a redirect without a Location header")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise FetchError(
                            "inaccessible_url",
                            f"the server answered HTTP {response.status_code}; "
                            "make sure the image URL is publicly accessible",
                        )
                    return _read_capped(response, max_bytes, deadline, timeout)
            except httpx.TimeoutException as e:
                raise FetchError("inaccessible_url", f"the server did not answer within {timeout:g} s") from e
            except httpx.HTTPError as e:
                raise FetchError("inaccessible_url", f"the image could not be downloaded ({e})") from e
        raise FetchError("inaccessible_url", f"more than {MAX_REDIRECTS} redirects; link the image directly")
    finally:
        if own:
            client.close()


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float, timeout: float) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError("image_too_large", _too_large(int(declared), max_bytes))
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("image_too_large", _too_large(size, max_bytes, at_least=True))
        if time.monotonic() > deadline:
            raise FetchError("inaccessible_url", f"the download took longer than {timeout:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return (
        f"the image is {more}{size / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB per image, "
        "so resize or recompress it"
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's own verifying context, built once per process: loading the CA bundle takes ~80 ms,
    which every validation paid (files without a single URL included) when each client built one."""
    return httpx.create_ssl_context(trust_env=False)


def make_client(timeout: float) -> httpx.Client:
    """A client for image fetches: no redirects (we follow and re-check them), no env proxies."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        verify=_tls_context(),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
    )
