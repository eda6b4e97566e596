"""Image URLs and bytes: decode ``data:`` URLs, fetch ``http(s)`` ones, check what they hold.

The rules are the vision guide's: at most 10 MB per image; JPEG, PNG or WEBP, judged by the
bytes (magic numbers), never by the URL or the declared MIME type; RGB or RGBA mode. On
top, for safety: a pixel limit against decompression bombs, a full decode (Pillow's
``verify()`` does not decode JPEG data, so a truncated JPEG passes it — ``load()`` is what
catches it), and animated images refused (one frame would silently be trained on).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from dataclasses import dataclass

from PIL import Image

from openft.datasets.fetch import FetchError, fetch_url
from openft.errors import InvalidRequest

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000  # ~7000 x 7000; far above any vision processor's input
DECODE_MAX_PIXELS = 2048 * 2048
"""Pixel budget of a decoded image kept in memory: larger ones shrink on load (JPEG decodes at
1/2-1/8 scale with ``draft()``, reading all its data; PNG/WEBP decode once, then ``reduce()``).
OpenAI itself fits high-detail images within 2048x2048 before its vision encoder."""
ALLOWED_MODES = ("RGB", "RGBA")
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
)
_OTHER_MAGIC = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
)


class ImageRejected(Exception):
    """An image that cannot be trained on; ``code`` is a stable skip code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "JPEG" | "PNG" | "WEBP"
    mode: str  # "RGB" | "RGBA"
    width: int
    height: int
    size: int  # bytes
    sha256: str


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic number; None when it is not one we accept."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe(data: bytes) -> str:
    head = data[:16].lstrip()
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return f"a {name} file"
    return "not an image" if data else "empty"


def decode_data_url(url: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Bytes of a ``data:[<mime>];base64,<payload>`` URL (strict base64). Raises ImageRejected."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageRejected(
            "invalid_image_format",
            "the data URL has no ',' separator; use data:image/png;base64,<base64 bytes>",
        )
    if not header.lower().endswith(";base64"):
        raise ImageRejected(
            "invalid_image_format",
            "the data URL is not base64-encoded; use data:image/png;base64,<base64 bytes>",
        )
    # Reject before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ImageRejected(
            "image_too_large",
            f"the image is about {len(payload) * 3 / 4 / 2**20:.1f} MB; the limit is "
            f"{max_bytes / 2**20:.0f} MB per image, so resize or recompress it",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageRejected(
            "invalid_image_format", f"the data URL is not valid base64 ({e}); re-encode the image"
        ) from e
    if len(data) > max_bytes:
        raise ImageRejected(
            "image_too_large",
            f"the image is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB "
            "per image, so resize or recompress it",
        )
    return data


def fetch_image_bytes(
    url: str, *, allow_private_networks: bool = False, timeout: float = 10.0, client=None
) -> bytes:
    """Bytes behind an image URL (data: or http(s)); raises ImageRejected with a skip code."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url)
    if scheme in ("http", "https"):
        try:
            return fetch_url(
                url,
                max_bytes=MAX_IMAGE_BYTES,
                timeout=timeout,
                allow_private_networks=allow_private_networks,
                client=client,
            )
        except FetchError as e:
            raise ImageRejected(e.code, f"{e.message} ({_short(url)})") from e
    raise ImageRejected(
        "inaccessible_url",
        f"unsupported image URL {_short(url)!r}; use an https:// URL or a data:image/...;base64 URL",
    )


def load_image_url(url: str, *, allow_private_networks: bool = False, timeout: float = 10.0) -> bytes:
    """Bytes of an image URL for any caller (chat completions too); raises InvalidRequest."""
    try:
        return fetch_image_bytes(url, allow_private_networks=allow_private_networks, timeout=timeout)
    except ImageRejected as e:
        raise InvalidRequest(f"Could not load the image: {e.message}", code=e.code) from e


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


def shrink_factor(width: int, height: int, max_pixels: int) -> int:
    """Smallest integer factor that brings ``width`` x ``height`` within ``max_pixels``."""
    factor = max(1, math.ceil(math.sqrt(width * height / max_pixels)))
    while math.ceil(width / factor) * math.ceil(height / factor) > max_pixels:
        factor += 1
    return factor


def load_within(image: Image.Image, max_pixels: int) -> Image.Image:
    """Decode an opened image to at most ``max_pixels`` pixels, aspect kept.

    JPEG: ``draft()`` makes libjpeg decode at 1/2, 1/4 or 1/8 scale, so the full-size pixels never
    exist (all the data is still read, so truncation is still caught). Other formats decode at full
    size once, then ``reduce()`` box-averages by an integer factor and the full image is dropped.
    """
    width, height = image.size
    factor = shrink_factor(width, height, max_pixels)
    if factor > 1 and image.format == "JPEG":
        # libjpeg scales by 1/2, 1/4 or 1/8; Pillow takes the largest scale whose result is at
        # least the requested size (by integer division), so ask for exactly 1/scale.
        scale = max(s for s in (1, 2, 4, 8) if s <= factor)
        image.draft(image.mode, (width // scale, height // scale))
    image.load()
    factor = shrink_factor(*image.size, max_pixels)
    if factor > 1:
        reduced = image.reduce(factor)
        image.close()
        image = reduced
    return image


def open_image(data: bytes, *, max_pixels: int = DECODE_MAX_PIXELS) -> Image.Image:
    """Decode bytes that already passed :func:`decode_image`, within ``max_pixels``."""
    return load_within(Image.open(io.BytesIO(data), formats=[sniff_format(data) or "PNG"]), max_pixels)


def decode_image(data: bytes, *, max_pixels: int = DECODE_MAX_PIXELS) -> tuple[ImageInfo, Image.Image]:
    """Check ``data`` fully and return its info (true size) plus the decoded image, shrunk on load
    to at most ``max_pixels`` (see :func:`load_within`). Raises ImageRejected."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected(
            "image_too_large",
            f"the image is {len(data) / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES / 2**20:.0f} MB "
            "per image, so resize or recompress it",
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(
            "invalid_image_format",
            f"the image is {_describe(data)}, not JPEG, PNG or WEBP; convert it to one of those",
        )
    try:
        # Pillow itself refuses only above 2x its own limit (~179 MP, header only); ours,
        # lower, is checked right after reading the header, before any pixel is decoded.
        image = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageRejected(
                "image_too_large",
                f"the image is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels, "
                "so downscale it",
            )
        if getattr(image, "is_animated", False) or getattr(image, "n_frames", 1) > 1:
            raise ImageRejected(
                "invalid_image_format",
                f"the image is an animated {fmt}; use a single still frame",
            )
        if image.mode not in ALLOWED_MODES:
            raise ImageRejected(
                "invalid_image_format",
                f"the image mode is {image.mode}; only RGB or RGBA images are accepted, so convert it to RGB",
            )
        image.verify()  # structure and checksums (PNG CRCs)
        image = Image.open(io.BytesIO(data), formats=[fmt])
        # A full decode (catches truncated JPEG/WEBP data that verify() misses), within the budget.
        image = load_within(image, max_pixels)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("image_too_large", f"the image has too many pixels ({e}); downscale it") from e
    except Exception as e:  # Pillow raises many types on corrupt data: OSError, SyntaxError, ...
        raise ImageRejected(
            "invalid_image_format",
            f"the {fmt} data could not be decoded ({type(e).__name__}: {e}); re-save the image",
        ) from e
    info = ImageInfo(
        format=fmt,
        mode=image.mode,
        width=width,
        height=height,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return info, image


def inspect_image(data: bytes) -> ImageInfo:
    """Format, mode and size of ``data`` after a full decode. Raises ImageRejected."""
    info, image = decode_image(data, max_pixels=_INSPECT_PIXELS)
    image.close()
    return info


_INSPECT_PIXELS = 64 * 64
"""Only the checks matter to ``inspect_image``: JPEGs decode at their smallest draft scale."""
