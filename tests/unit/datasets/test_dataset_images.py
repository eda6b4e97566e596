import io

import pytest
from PIL import Image

from openft.datasets.images import (
    MAX_IMAGE_BYTES,
    ImageRejected,
    decode_data_url,
    inspect_image,
    load_image_url,
)
from openft.errors import InvalidRequest

from .conftest import data_url, png_bytes


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepts_the_three_formats(fmt: str) -> None:
    info = inspect_image(encode(Image.new("RGB", (20, 10), "red"), fmt))
    assert (info.format, info.mode, info.width, info.height) == (fmt, "RGB", 20, 10)
    assert len(info.sha256) == 64


def test_rgba_is_accepted() -> None:
    assert inspect_image(png_bytes((1, 2, 3, 4), mode="RGBA")).mode == "RGBA"


def code_of(data: bytes) -> str:
    with pytest.raises(ImageRejected) as e:
        inspect_image(data)
    assert e.value.message
    return e.value.code


def test_format_is_judged_by_bytes() -> None:
    assert code_of(encode(Image.new("RGB", (4, 4)), "GIF")) == "invalid_image_format"
    assert code_of(encode(Image.new("RGB", (4, 4)), "BMP")) == "invalid_image_format"
    assert code_of(b"<svg xmlns='http://www.w3.org/2000/svg'/>") == "invalid_image_format"
    # A PNG declared as JPEG is still a PNG: the MIME type in the data URL is ignored.
    assert inspect_image(decode_data_url(data_url(png_bytes(), "image/jpeg"))).format == "PNG"


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "1"])
def test_modes_other_than_rgb_rgba_are_refused(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert code_of(encode(Image.new(mode, (4, 4)), fmt)) == "invalid_image_format"


def test_truncated_jpeg_is_caught_by_the_full_decode() -> None:
    noisy = Image.effect_noise((64, 64), 50).convert("RGB")
    data = encode(noisy, "JPEG")
    assert code_of(data[: len(data) // 2]) == "invalid_image_format"


def test_corrupt_png_crc_is_caught() -> None:
    data = bytearray(png_bytes())
    data[40] ^= 0xFF
    assert code_of(bytes(data)) == "invalid_image_format"


def test_animated_images_are_refused() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
    assert code_of(buf.getvalue()) == "invalid_image_format"
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])  # APNG
    assert code_of(buf.getvalue()) == "invalid_image_format"


def test_decompression_bomb_is_refused_from_the_header() -> None:
    assert code_of(encode(Image.new("1", (10_000, 6_000)), "PNG")) == "image_too_large"


def test_size_limit() -> None:
    assert code_of(b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_IMAGE_BYTES) == "image_too_large"
    with pytest.raises(ImageRejected) as e:
        decode_data_url("data:image/png;base64," + "A" * (MAX_IMAGE_BYTES // 3 * 4 + 100))
    assert e.value.code == "image_too_large"


@pytest.mark.parametrize(
    "url", ["data:image/png;base64,not base64!", "data:image/png,rawbytes", "data:image/png;base64"]
)
def test_bad_data_urls(url: str) -> None:
    with pytest.raises(ImageRejected) as e:
        decode_data_url(url)
    assert e.value.code == "invalid_image_format"


def test_load_image_url_raises_invalid_request() -> None:
    assert load_image_url(data_url(png_bytes())) == png_bytes()
    with pytest.raises(InvalidRequest) as e:
        load_image_url("ftp://example.com/a.png")
    assert "https" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        load_image_url("http://127.0.0.1/a.png")
    assert "loopback" in e.value.message and e.value.code == "inaccessible_url"
