"""The default offline moderator on real photos (scikit-image) and generated CAPTCHAs.

These pin the measured behaviour documented in ``openft.datasets.moderation``.
"""

import random
import string

import numpy as np
import pytest
from PIL import Image

from openft.datasets.moderation import (
    Moderator,
    NoopModerator,
    OpenCVModerator,
    captcha_score,
    load_moderator,
)

skimage_data = pytest.importorskip("skimage.data")
captcha_image = pytest.importorskip("captcha.image")

PEOPLE = ["astronaut", "camera"]
NO_PEOPLE = [
    "coffee", "chelsea", "rocket", "coins", "retina", "immunohistochemistry", "hubble_deep_field", "horse",
    "moon", "page", "text", "clock", "colorwheel", "brick", "grass", "gravel", "cell", "logo", "checkerboard",
]  # fmt: skip


def photo(name: str) -> Image.Image:
    x = getattr(skimage_data, name)()
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    if x.ndim == 2:
        x = np.stack([x] * 3, axis=-1)
    return Image.fromarray(x)  # RGB, or RGBA for logo


@pytest.fixture(scope="module")
def moderator() -> OpenCVModerator:
    return OpenCVModerator()


@pytest.mark.parametrize("name", PEOPLE)
def test_people_photos_are_flagged(moderator: OpenCVModerator, name: str) -> None:
    result = moderator.moderate(photo(name))
    assert {"faces", "people"} <= result.flagged


@pytest.mark.parametrize("name", NO_PEOPLE)
def test_photos_without_people_pass(moderator: OpenCVModerator, name: str) -> None:
    assert moderator.moderate(photo(name)).flagged == frozenset()


def test_lfw_faces_recall(moderator: OpenCVModerator) -> None:
    faces = skimage_data.lfw_subset()[:100]
    found = 0
    for face in faces:
        img = Image.fromarray((face * 255).astype(np.uint8)).resize((96, 96), Image.BICUBIC)
        canvas = Image.new("L", (144, 144), int(np.median(face) * 255))
        canvas.paste(img, (24, 24))
        found += "faces" in moderator.moderate(canvas.convert("RGB")).flagged
    assert found >= 95  # measured 98/100


class _SeededSecrets:
    """Stands in for ``secrets`` inside the captcha package, so generated images repeat."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq):
        return self._rng.choice(seq)


def captchas(n: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    real, captcha_image.secrets = captcha_image.secrets, _SeededSecrets(seed)
    out = []
    try:
        for _ in range(n):
            width, height = rng.choice([(160, 60), (200, 70), (250, 80), (120, 40), (280, 90)])
            text = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(4, 6)))
            out.append(captcha_image.ImageCaptcha(width=width, height=height).generate_image(text))
    finally:
        captcha_image.secrets = real
    return out


def test_captcha_recall() -> None:
    hits = sum(captcha_score(np.asarray(im.convert("RGB"))) >= 0.5 for im in captchas(100))
    assert hits >= 85  # measured 89/100 at this seed, 94 at seeds 1 and 2 (misses: mostly 120x40)


@pytest.mark.parametrize("size", [(120, 40), (160, 60), (250, 80), (300, 100)])
def test_captcha_heuristic_spares_photos_at_captcha_size(size) -> None:
    for name in PEOPLE + NO_PEOPLE:
        small = photo(name).convert("RGB").resize(size)
        assert captcha_score(np.asarray(small)) < 0.5, name


def test_captchas_are_flagged_by_the_moderator(moderator: OpenCVModerator) -> None:
    result = moderator.moderate(captchas(1, seed=3)[0])
    assert result.flagged == {"captcha"} and result.scores["children"] == 0.0


def test_pluggable_moderators() -> None:
    noop = load_moderator("openft.datasets.moderation:NoopModerator")
    assert isinstance(noop, NoopModerator) and isinstance(noop, Moderator)
    assert noop.moderate(photo("astronaut")).flagged == frozenset()
    for bad in ("openft.datasets.moderation", "openft.datasets.moderation:CATEGORIES"):
        with pytest.raises((ValueError, TypeError)):
            load_moderator(bad)
