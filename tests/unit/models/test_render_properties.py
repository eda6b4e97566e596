"""Property tests: image tokens always match image features, and truncation never cuts an image.

Random conversations (0-10 images of random size, aspect and ``detail``; random text that
includes control and image-placeholder strings typed as text; random weights; a tiny
``max_length``) are rendered for each family (Qwen2-VL, LLaVA, Qwen2.5-VL, Qwen3-VL). The rendered number of image
placeholder tokens must equal what the vision encoder produces for the vision tensors rendered
with them, and a truncated render is either a clean ``InvalidRequest`` or a prefix of the full
render that ends after a complete trained reply, with only complete images. Rendering only; the
real vision encoder runs on a handful of cases in ``test_vision_encoder_agrees``.

CI (``CI`` set) uses a derandomized profile: the same cases on every run.
"""

from __future__ import annotations

import io
import os
import re
from functools import cache
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from openft.datasets.formats import ImagePart, Message, TextPart
from openft.errors import InvalidRequest
from openft.models.families import family_of
from openft.models.loader import load_model
from openft.models.render import IGNORE_INDEX, TOKEN_ALIGNED_KEYS, Rendered, render_chat
from tests.unit.models import tiny_gemma3
from tests.unit.models.tiny_llava import build_processor, build_tiny_llava
from tests.unit.models.tiny_qwen_vl import build_processor as build_qwen_processor
from tests.unit.models.tiny_qwen_vl import build_tiny_qwen_vl
from tests.unit.models.tiny_smolvlm import build_processor as build_smolvlm_processor
from tests.unit.models.tiny_smolvlm import build_tiny_smolvlm

FAMILIES = ["qwen2_vl", "llava", "qwen2_5_vl", "qwen3_vl", "gemma3", "smolvlm"]
PIXEL_BUDGET = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
"""Families whose images are a grid of merged patches (``image_grid_thw``), each its own run of
placeholders between ``<|vision_start|>`` and ``<|vision_end|>``."""

settings.register_profile(
    "openft-render-ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "openft-render-dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("openft-render-ci" if os.environ.get("CI") else "openft-render-dev")
DEEP = bool(os.environ.get("CI") or os.environ.get("OPENFT_DEEP_PROPERTIES"))
"""CI (``make test``) draws the full number of examples; the local fast lane (``make unit``) a
fifth of it, so it stays under two minutes with six families (the properties are the same)."""


def examples(n: int) -> int:
    return n if DEEP else max(5, n // 5)


@cache
def _png(w: int, h: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (shade, 255 - shade, 60)).save(buf, "PNG")
    return buf.getvalue()


images = st.builds(
    lambda w, h, shade, detail: ImagePart(
        url="data:image/png;base64,...", data=_png(w, h, shade), detail=detail
    ),
    # Sometimes large enough for Gemma 3's pan-and-scan crops (at least 256 px each) at "high".
    st.one_of(st.integers(8, 300), st.sampled_from([540, 800])),
    st.integers(8, 300),
    st.integers(0, 255),
    st.sampled_from(["low", "high", "auto"]),
)
CONTROL_STRINGS = (
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<|eot_id|>",
    "<|start_header_id|>",
)
"""Typed by users as text: must stay text (an image placeholder among them would break the
image-token count the tests check)."""
words = st.lists(
    st.one_of(st.text(alphabet="abcdefg <>|_!\n", max_size=12), st.sampled_from(CONTROL_STRINGS)), max_size=5
).map("".join)


@st.composite
def conversations(draw) -> list[Message]:
    """1-4 user/assistant rounds, 0-10 images spread over the user turns, random weights."""
    n_rounds = draw(st.integers(1, 4))
    n_images = draw(st.integers(0, 10))
    where = [draw(st.integers(0, n_rounds - 1)) for _ in range(n_images)]
    msgs: list[Message] = []
    if draw(st.booleans()):
        msgs.append(Message("system", (TextPart(draw(words)),)))
    for k in range(n_rounds):
        parts: list[Any] = [draw(images) for _ in range(where.count(k))]
        parts.insert(draw(st.integers(0, len(parts))), TextPart(draw(words)))
        msgs.append(Message("user", tuple(parts)))
        reply = draw(words)
        msgs.append(
            Message(
                "assistant", (TextPart(reply),) if reply else (), weight=draw(st.sampled_from([0, 1, None]))
            )
        )
    return msgs


# --- what the vision encoder produces, from the model config alone -------------------------------


def encoder_tokens(family: str, config: Any, vision: dict[str, torch.Tensor]) -> list[int]:
    """Features per image the model's vision encoder yields for these rendered vision tensors."""
    if not vision:
        return []
    if family in PIXEL_BUDGET:
        merge = config.vision_config.spatial_merge_size
        return [int(t) // merge**2 for t in vision["image_grid_thw"].prod(-1)]
    if family == "smolvlm":  # per image: its real (not all-zero padding) tiles, each pixel-shuffled
        svc = config.vision_config
        per_tile = (svc.image_size // svc.patch_size) ** 2 // config.scale_factor**2
        tiles = (vision["pixel_values"] != 0).flatten(2).any(-1).sum(-1)
        return [int(t) * per_tile for t in tiles]
    if family == "gemma3":  # one pooled square per image or pan-and-scan crop
        return [config.mm_tokens_per_image] * vision["pixel_values"].shape[0]
    vc = config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2 + (
        0 if config.vision_feature_select_strategy == "default" else 1
    )
    return [per_image] * vision["pixel_values"].shape[0]


@pytest.fixture(scope="module")
def llava_processor():
    return build_processor()


@pytest.fixture(scope="module")
def llava_config():
    from transformers import AutoConfig  # noqa: PLC0415

    return AutoConfig.for_model(
        "llava",
        vision_config={"model_type": "clip_vision_model", "image_size": 56, "patch_size": 14},
        vision_feature_select_strategy="default",
    )


@pytest.fixture(scope="module")
def qwen_vl_dirs(tmp_path_factory: pytest.TempPathFactory):
    """Folders of the tiny Qwen2.5-VL and Qwen3-VL, built on first use."""
    built: dict[str, Any] = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_qwen_vl(family, tmp_path_factory.mktemp(family) / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def smolvlm_config():
    from transformers import AutoConfig  # noqa: PLC0415

    from tests.unit.models.tiny_smolvlm import PATCH_SIZE, SCALE_FACTOR, TILE  # noqa: PLC0415

    return AutoConfig.for_model(
        "smolvlm", vision_config={"image_size": TILE, "patch_size": PATCH_SIZE}, scale_factor=SCALE_FACTOR
    )


@pytest.fixture(scope="module")
def gemma3_processor():
    return tiny_gemma3.build_processor()


@pytest.fixture(scope="module")
def gemma3_config():
    from transformers import AutoConfig  # noqa: PLC0415

    return AutoConfig.for_model(
        "gemma3",
        vision_config={
            "model_type": "siglip_vision_model",
            "image_size": tiny_gemma3.IMAGE_SIZE,
            "patch_size": 14,
        },
        mm_tokens_per_image=tiny_gemma3.TOKENS_PER_IMAGE,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def fam(
    request, tiny, llava_processor, llava_config, qwen_vl_dirs, gemma3_processor, gemma3_config
) -> tuple[str, Any, Any]:
    """(family, processor, model config)."""
    if request.param == "qwen2_vl":
        tiny = request.getfixturevalue("tiny")
        return "qwen2_vl", tiny[1], tiny[0].config
    if request.param == "llava":
        return "llava", llava_processor, llava_config
    if request.param == "gemma3":
        return "gemma3", gemma3_processor, gemma3_config
    if request.param == "smolvlm":
        return "smolvlm", build_smolvlm_processor(), request.getfixturevalue("smolvlm_config")
    from transformers import AutoConfig  # noqa: PLC0415

    path = qwen_vl_dirs(request.param)
    return request.param, build_qwen_processor(request.param), AutoConfig.from_pretrained(path)


def _image_runs(ids: list[int], image_id: int) -> list[int]:
    runs, n = [], 0
    for i in [*ids, -1]:
        if i == image_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def feature_id(proc: Any) -> int:
    """The token that stands for one vision feature (Gemma 3: ``<image_soft_token>``, not the
    ``<start_of_image>`` its template emits)."""
    fam = family_of(proc)
    return proc.tokenizer.convert_tokens_to_ids(fam.feature_token or proc.image_token)


def check_images(family: str, proc: Any, config: Any, r: Rendered) -> None:
    image_id = feature_id(proc)
    expected = encoder_tokens(family, config, r.vision)
    if family == "smolvlm":  # its image span also holds the tile markers: more tokens than features
        assert r.input_ids.count(image_id) == sum(expected) <= r.n_image_tokens
        check_tile_structure(proc, r, expected)
    else:
        assert r.input_ids.count(image_id) == r.n_image_tokens == sum(expected)
    if family in PIXEL_BUDGET or family == "gemma3":  # each image (crop) is its own run of features
        assert _image_runs(r.input_ids, image_id) == expected
    # Every feature token lies inside an image span, and the spans do not overlap.
    spans = sorted(r.image_spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    inside = {p for s_, e_ in spans for p in range(s_, e_)}
    assert {p for p, i in enumerate(r.input_ids) if i == image_id} <= inside
    for key in TOKEN_ALIGNED_KEYS & set(r.vision):
        assert r.vision[key].tolist() == [int(i == image_id) for i in r.input_ids]


@settings(PROFILE, max_examples=examples(150))
@given(msgs=conversations(), max_length=st.integers(1, 300))
def test_image_tokens_match_features_and_truncation_is_clean(fam, msgs, max_length) -> None:
    family, proc, config = fam
    full = render_chat(proc, msgs)
    check_images(family, proc, config, full)
    n_images = sum(len(m.images) for m in msgs)
    assert len(full.image_spans) == n_images
    if family != "gemma3":
        assert len(encoder_tokens(family, config, full.vision)) == n_images
    elif len(encoder_tokens(family, config, full.vision)) > n_images:
        event("pan-and-scan crops")  # Gemma 3 encodes each crop as an image of its own

    try:
        r = render_chat(proc, msgs, max_length=max_length)
    except InvalidRequest as e:
        event("refused: no trained token within the limit")
        assert e.code == "no_trained_tokens_within_limit" and e.param == "messages"
        assert len(full.input_ids) > max_length
        # Right to refuse: no trained token before the limit (or before the image it would cut).
        cut = max_length
        for s_, e_ in full.image_spans:
            if s_ < cut < e_:
                cut = s_
        assert all(lab == IGNORE_INDEX for lab in full.labels[:cut])
        return
    check_images(family, proc, config, r)
    if len(full.input_ids) <= max_length:
        event("fits")
        assert r.input_ids == full.input_ids and r.labels == full.labels
        return
    # A prefix of the full render cut at the limit, or earlier only to keep an image whole.
    n = len(r.input_ids)
    event("truncated, with images dropped" if r.n_image_tokens < full.n_image_tokens else "truncated")
    assert n <= max_length
    assert r.input_ids == full.input_ids[:n] and r.labels == full.labels[:n]
    if n < max_length:  # the cut fell inside an image: dropped whole
        assert any(s_ == n < max_length < e_ for s_, e_ in full.image_spans)
    assert r.image_spans == [sp for sp in full.image_spans if sp[1] <= n]
    assert any(lab != IGNORE_INDEX for lab in r.labels)
    # Only complete images: their vision tensors are the first k of the full render's.
    k = len(encoder_tokens(family, config, r.vision))
    for key, value in r.vision.items():
        if key not in TOKEN_ALIGNED_KEYS:
            full_value = full.vision[key]
            rows = value.shape[0]
            # Tile-splitting families pad to the most tiles of the images kept: compare unpadded.
            inner = tuple(slice(0, d) for d in value.shape)
            assert torch.equal(value, full_value[inner])
            padding = full_value[:rows].clone()
            padding[inner] = 0
            assert not padding.any()
    assert sum(encoder_tokens(family, config, full.vision)[:k]) == r.input_ids.count(feature_id(proc))


def check_tile_structure(proc: Any, r: Rendered, expected: list[int]) -> None:
    """SmolVLM: each image is exactly the processor's expansion for its tiles, whole and in order:
    a full rows x cols grid of ``<fake><row_R_col_C><image>*n`` with a newline after each row,
    then ``\n<fake><global-img><image>*n<fake>`` (only the global part when it is not split),
    and no vision-structure token anywhere else."""
    n = proc.image_seq_len
    fake, glob, img = (
        re.escape(t) for t in (proc.fake_image_token, proc.global_image_token, proc.image_token)
    )
    tail = f"{fake}{glob}(?:{img}){{{n}}}{fake}"
    span = re.compile(f"((?:(?:{fake}<row_\\d+_col_\\d+>(?:{img}){{{n}}})+\n)+\n)?{tail}")
    text = proc.tokenizer.decode(r.input_ids)
    matches = list(span.finditer(text))
    tiles = []
    for m in matches:
        grid = [tuple(map(int, rc)) for rc in re.findall(r"<row_(\d+)_col_(\d+)>", m.group(1) or "")]
        if grid:  # a full grid, row by row
            rows, cols = max(g[0] for g in grid), max(g[1] for g in grid)
            assert grid == [(rr, cc) for rr in range(1, rows + 1) for cc in range(1, cols + 1)]
        tiles.append(len(grid) + 1)
    assert [t * n for t in tiles] == expected
    # Marker ids only where the processor put them (user text typing a marker stays plain text):
    # one <fake> per tile plus one closing each image, one <global-img> and a row marker per tile.
    ids, vocab = r.input_ids, proc.tokenizer.get_vocab()
    assert ids.count(vocab[proc.fake_image_token]) == sum(t + 1 for t in tiles)
    assert ids.count(vocab[proc.global_image_token]) == len(tiles)
    rows = {vocab[t] for t in vocab if re.fullmatch(r"<row_\d+_col_\d+>", t)}
    assert sum(i in rows for i in ids) == sum(t - 1 for t in tiles)


# --- the real vision encoder, on a few cases -----------------------------------------------------


@pytest.fixture(scope="module")
def llava_model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")), device="cpu")


@pytest.fixture(scope="module", params=FAMILIES)
def fam_model(request, tiny, llava_model, qwen_vl_dirs) -> tuple[str, Any, Any]:
    if request.param in ("qwen2_vl", "llava"):
        model, proc = tiny if request.param == "qwen2_vl" else llava_model
    elif request.param == "gemma3":
        model, proc = request.getfixturevalue("gemma3")
    elif request.param == "smolvlm":
        model, proc = load_model(
            str(build_tiny_smolvlm(request.getfixturevalue("tmp_path_factory").mktemp("smolvlm") / "m")),
            device="cpu",
        )
    else:
        model, proc = load_model(str(qwen_vl_dirs(request.param)), device="cpu")
    return request.param, model, proc


@settings(PROFILE, max_examples=5)
@given(msgs=conversations())
def test_vision_encoder_agrees(fam_model, msgs) -> None:
    family, model, proc = fam_model
    r = render_chat(proc, msgs)
    check_images(family, proc, model.config, r)
    if not r.vision:
        return
    kwargs = {k: v for k, v in r.vision.items() if k not in TOKEN_ALIGNED_KEYS}
    with torch.no_grad():
        feats = model.model.get_image_features(**kwargs).pooler_output
        assert [f.shape[0] for f in feats] == encoder_tokens(family, model.config, r.vision)
        assert sum(f.shape[0] for f in feats) == r.input_ids.count(feature_id(proc)) <= r.n_image_tokens
        # Qwen3-VL's DeepStack: every inner-layer feature set matches the image tokens as well.
        for layer in getattr(model.model.get_image_features(**kwargs), "deepstack_features", None) or []:
            assert [f.shape[0] for f in layer] == encoder_tokens(family, model.config, r.vision)
        # The full forward also checks that placeholders and features line up (it raises if not).
        inputs = {"input_ids": torch.tensor([r.input_ids]), **kwargs}
        for key in TOKEN_ALIGNED_KEYS & set(r.vision):
            inputs[key] = r.vision[key][None]
        assert model(**inputs).logits.shape[1] == len(r.input_ids)
