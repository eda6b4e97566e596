"""Pictures for the moderation tests and the validation bench: scikit-image's bundled photos (with
and without people) and generated people-free pictures at real sizes (448-1,024 px)."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PEOPLE = ["astronaut", "camera"]
NO_PEOPLE = [
    "coffee", "chelsea", "rocket", "coins", "retina", "immunohistochemistry", "hubble_deep_field", "horse",
    "moon", "page", "text", "clock", "colorwheel", "brick", "grass", "gravel", "cell", "logo", "checkerboard",
]  # fmt: skip
KINDS = ("shapes", "blobs", "gradient", "noise", "chart", "text")


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as RGB (RGBA for ``logo``)."""
    import skimage.data

    x = getattr(skimage.data, name)()
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    if x.ndim == 2:
        x = np.stack([x] * 3, axis=-1)
    return Image.fromarray(x)


def synthetic(kind: str, width: int, height: int, rng: random.Random) -> Image.Image:
    """A people-free RGB picture: coloured shapes, soft colour blobs, a gradient, smooth noise, a bar
    chart, or lines of text."""
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    if kind == "gradient":
        a, b = np.array(colour(), float), np.array(colour(), float)
        t = (
            np.linspace(0, 1, width)[None, :, None] * rng.random()
            + np.linspace(0, 1, height)[:, None, None] * rng.random()
        )
        t = t / max(t.max(), 1e-6)
        return Image.fromarray((a + (b - a) * t).astype(np.uint8))
    if kind == "noise":
        small = np.array([[colour() for _ in range(8)] for _ in range(8)], np.uint8)
        return Image.fromarray(small).resize((width, height), Image.BICUBIC)
    img = Image.new("RGB", (width, height), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    if kind == "shapes":
        for _ in range(rng.randint(1, 6)):
            r = rng.randint(min(width, height) // 12, min(width, height) // 4)
            cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            shape = rng.choice(("ellipse", "rectangle", "polygon"))
            if shape == "polygon":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour())
            else:
                getattr(draw, shape)(box, fill=colour())
    elif kind == "blobs":
        for _ in range(rng.randint(3, 12)):
            r = rng.randint(min(width, height) // 16, min(width, height) // 4)
            cx, cy = rng.randrange(width), rng.randrange(height)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour())
        img = img.filter(ImageFilter.GaussianBlur(min(width, height) / 40))
    elif kind == "chart":
        n = rng.randint(3, 12)
        bar = (width - 80) // n
        for i in range(n):
            top = rng.randint(40, height - 60)
            draw.rectangle((60 + i * bar, top, 60 + (i + 1) * bar - 6, height - 40), fill=colour())
        draw.line((50, 20, 50, height - 40, width - 10, height - 40), fill=(0, 0, 0), width=2)
    elif kind == "text":
        for y in range(20, height - 20, 24):
            words = " ".join(
                rng.choice(["data", "model", "train", "loss", "image", "value"]) for _ in range(12)
            )
            draw.text((20, y), words, fill=(20, 20, 20))
    else:
        raise ValueError(kind)
    return img


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def people_free(n: int, seed: int = 0, sizes: tuple[int, int] = (448, 1024)) -> list[Image.Image]:
    """``n`` generated people-free pictures, every kind in turn, sides drawn from ``sizes``."""
    rng = random.Random(seed)
    return [synthetic(KINDS[i % len(KINDS)], rng.randint(*sizes), rng.randint(*sizes), rng) for i in range(n)]


def photo_variants(n: int, seed: int = 0, sizes: tuple[int, int] = (448, 1024)) -> list[Image.Image]:
    """``n`` distinct people-free photos: a random crop of a scikit-image photo, resized so its
    longer side is in ``sizes``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        im = photo(NO_PEOPLE[i % len(NO_PEOPLE)]).convert("RGB")
        w, h = im.size
        cw, ch = rng.randint(w * 3 // 4, w), rng.randint(h * 3 // 4, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        side = rng.randint(*sizes)
        scale = side / max(cw, ch)
        out.append(
            im.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        )
    return out


def chat_line(question: str, answer: str, image: bytes | None = None, mime: str = "png") -> str:
    """One supervised JSONL line: a user question (with ``image`` inline, if any) and the answer."""
    import base64
    import json

    content: object = question
    if image is not None:
        url = f"data:image/{mime};base64," + base64.b64encode(image).decode()
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return json.dumps(
        {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
    )
