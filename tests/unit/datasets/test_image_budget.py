"""Issue 12, item 7: images decode within a pixel budget, so memory per image is bounded.

A 7071x7071 image (50 MP, just under the pixel limit; ~1 MB as PNG or JPEG) used to cost ~670 MB
per chat: it was decoded at full size twice and converted on top. Now JPEG decodes at 1/2-1/8
scale (``draft``) and PNG decodes once and is ``reduce``d at once. Memory is measured as the
peak RSS growth of a fresh process (Pillow allocates outside Python, so tracemalloc misses it).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from openft.datasets.images import (
    DECODE_MAX_PIXELS,
    MAX_IMAGE_BYTES,
    ImageRejected,
    decode_image,
    inspect_image,
    open_image,
    shrink_factor,
)

SIDE = 7071
MB = 1024 * 1024


def big_png(path: Path, side: int = SIDE, alpha: bool = False) -> Path:
    """A ``side`` x ``side`` PNG written row by row (never held in memory as pixels)."""
    bands = 4 if alpha else 3

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 6 if alpha else 2, 0, 0, 0)
    row = bytes((x * 7 + (x // 64) * 13) & 0xFF for x in range(side * bands))
    z = zlib.compressobj(9)
    idat = [z.compress(b"\x00" + row[y % 97 :] + row[: y % 97]) for y in range(side)] + [z.flush()]
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")
    )
    return path


def big_jpeg(path: Path, side: int = SIDE) -> Path:
    Image.radial_gradient("L").resize((side, side)).convert("RGB").save(path, quality=80)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("big-images")
    out = {
        "png": big_png(d / "big.png"),
        "rgba": big_png(d / "big-rgba.png", alpha=True),
        "jpeg": big_jpeg(d / "big.jpg"),
    }
    assert all(p.stat().st_size <= MAX_IMAGE_BYTES for p in out.values())  # within the 10 MB rule
    return out


def peak_growth_mb(code: str, path: Path, setup: str = "") -> float:
    """Peak RSS growth (MB) of a fresh process while it runs ``code`` on the bytes of ``path``
    (``data``), measured after ``setup``."""
    script = f"""
import json, resource, sys
from pathlib import Path
from openft.datasets.images import decode_image, open_image
data = Path({str(path)!r}).read_bytes()
{setup}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{code}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps((after - before) / 1024))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("width", "height", "budget"), [(7071, 7071, 2048 * 2048), (10, 10_000, 999), (5000, 3, 7)]
)
def test_shrink_factor_is_the_smallest_that_fits(width: int, height: int, budget: int) -> None:
    f = shrink_factor(width, height, budget)
    fits = lambda k: -(-width // k) * -(-height // k) <= budget  # noqa: E731
    assert fits(f) and (f == 1 or not fits(f - 1))


def test_big_images_keep_their_true_size_in_the_info_and_shrink_in_memory(images: dict[str, Path]) -> None:
    for kind, path in images.items():
        info, image = decode_image(path.read_bytes())
        with image:
            assert (info.width, info.height) == (SIDE, SIDE), kind  # the report names the real size
            assert image.width * image.height <= DECODE_MAX_PIXELS, kind
            assert image.width >= 1024 and abs(image.width - image.height) <= 1, kind  # aspect kept
        assert info.mode == ("RGBA" if kind == "rgba" else "RGB")


def test_truncated_images_are_still_caught_when_decoded_small(images: dict[str, Path]) -> None:
    for kind in ("png", "jpeg"):
        data = images[kind].read_bytes()
        with pytest.raises(ImageRejected) as err:
            inspect_image(data[: len(data) * 2 // 3])
        assert err.value.code == "invalid_image_format" and "decoded" in err.value.message


def test_small_images_are_untouched() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (1, 2, 3)).save(buf, "PNG")
    with open_image(buf.getvalue()) as image:
        assert image.size == (640, 480) and image.getpixel((5, 5)) == (1, 2, 3)


def test_decode_memory_is_bounded(images: dict[str, Path]) -> None:
    """Full size would be 200 MB of pixels (Pillow keeps RGB at 4 bytes per pixel), decoded twice
    plus conversions before. JPEG now never exists at full size; PNG exists once, briefly."""
    jpeg = peak_growth_mb("decode_image(data)[1].close(); open_image(data).close()", images["jpeg"])
    png = peak_growth_mb("decode_image(data)[1].close(); open_image(data).close()", images["png"])
    rgba = peak_growth_mb("decode_image(data)[1].close(); open_image(data).close()", images["rgba"])
    full = SIDE * SIDE * 4 / MB  # one full-size decode: 191 MB
    budget = DECODE_MAX_PIXELS * 4 / MB  # the kept image: 16 MB
    assert jpeg < 3 * budget, jpeg
    assert png < full + 3 * budget and rgba < full + 3 * budget, (png, rgba)


@pytest.mark.slow  # two fresh processes import torch, load the tiny VLM and render a 50 MP image
def test_a_chat_with_a_huge_image_stays_within_budget(images: dict[str, Path]) -> None:
    """The whole chat prompt path (fetch, checks, render through the tiny VLM's processor)."""
    from openft.models.tiny import ensure_tiny_vlm
    from tests.conftest import model_cache

    tiny = ensure_tiny_vlm(model_cache())
    setup = f"""
import base64
from openft.datasets.images import load_image_url
from openft.inference.chat import build_prompt
from openft.inference.registry import ModelRef, Registry
from openft.protocol.chat import ChatCompletionRequest
loaded = Registry(device="cpu").get(ModelRef(id="tiny", base={str(tiny)!r}, weights_dir=None))
def ask(parts):
    request = ChatCompletionRequest.model_validate({{"model": "tiny", "messages": [{{"role": "user", "content": parts}}]}})
    return build_prompt(loaded, request, image_loader=load_image_url)
ask("warm up")
"""
    code = """
url = "data:image/png;base64," + base64.b64encode(data).decode()
prompt, image_tokens = ask([{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}])
assert image_tokens > 0
"""
    full = SIDE * SIDE * 4 / MB
    png = peak_growth_mb(code, images["png"], setup)
    jpeg = peak_growth_mb(code, images["jpeg"], setup)
    assert png < full + 64, png  # measured 671 MB before the budget, ~205 MB after
    assert jpeg < 64, jpeg  # measured 671 MB before, ~45 MB after
