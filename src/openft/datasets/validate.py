"""Validate a training file: every rule checked, every problem reported together.

``validate_file`` streams the JSONL, checks each line's structure (errors make the file
untrainable), then resolves its images in small chunks on a thread pool — decode the data
URL or fetch the HTTP URL, decode fully, moderate — and leaves out the examples whose
images fail (skips: the job goes on without them). Memory stays flat in the file size
apart from the usable examples it returns; ``iter_validate`` streams those too.

The per-line rules are pure and live in ``datasets.rules``; this module is the pipeline around
them (streaming, the thread pool, HTTP fetches, moderation, token counts, the report). Bad user
data never raises: it becomes an ``Issue`` with a line, a field path like
``messages[2].content[0].image_url.url``, a stable code and a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from openft.datasets.fetch import make_client
from openft.datasets.formats import (
    ChatExample,
    Example,
    PreferenceExample,
)
from openft.datasets.images import (
    DECODE_MAX_PIXELS,
    ImageInfo,
    ImageRejected,
    decode_image,
    fetch_image_bytes,
)
from openft.datasets.legacy import LEGACY_CODE, LEGACY_MESSAGE, upgrade_functions
from openft.datasets.lines import read_jsonl
from openft.datasets.moderation import SKIP_CODE, SKIP_PHRASE, Moderator, default_moderator, verdicts_for
from openft.datasets.report import Issue, Report, Severity, Summary
from openft.datasets.rules import DEFAULT_CONTROL_TOKENS, LineCheck, check_chat, check_preference
from openft.datasets.tokens import TokenCount, TokenCounter, TokenStats, estimate_tokens
from openft.errors import InvalidRequest
from openft.threads import available_cores

MAX_IMAGES_PER_EXAMPLE = 10
MAX_IMAGE_EXAMPLES = 50_000
_CHUNK = 32  # lines per image-resolution batch: bounds memory, keeps the pool busy
_FETCH_THREADS = 8  # fetches wait on the network; decoding and OpenCV release the GIL
# Decoding and moderation are CPU-bound: at most one image per core is judged at a time (the other
# pool threads wait on the network or here). Eight at once on 2 cores cost 10-25% more CPU per
# image (measured; bench/README.md).
# When one example has images failing for several reasons, the first of these is reported.
_MODERATION_ORDER = ("children", "faces", "people", "captcha")


@dataclass
class ValidationOptions:
    allow_private_networks: bool = False
    """Allow image URLs on loopback/private/link-local addresses (tests, trusted intranets)."""
    fetch_timeout: float = 10.0
    """Seconds for each image download, redirects included."""
    moderator: Moderator | None = None
    """Image moderation; None means the default offline one (``default_moderator()``)."""
    token_counter: TokenCounter | None = None
    """The model's own counter (from its processor); None means a rough estimate."""
    max_tokens: int | None = None
    """The model's context length; longer examples get an ``example_too_long`` warning."""
    control_tokens: Sequence[str] | None = None
    """Special tokens text may not contain; None means ``DEFAULT_CONTROL_TOKENS``."""
    image_sink: Callable[[str, bytes], None] | None = None
    """Called once per distinct usable image with (sha256, bytes), e.g. to store the blob."""
    progress: Callable[[int], None] | None = None
    """Called with the number of examples (non-blank lines) done so far."""
    min_examples: int = 10
    """Fewest usable examples a trainable file must have."""


@dataclass
class ValidationResult:
    report: Report
    examples: list[ChatExample | PreferenceExample]  # usable examples only


def validate_file(
    fp: BinaryIO,
    *,
    method: Literal["supervised", "dpo"],
    options: ValidationOptions = ValidationOptions(),  # noqa: B008 - a frozen-by-convention default
) -> ValidationResult:
    """Validate a JSONL training file for ``method``; never raises for bad data."""
    validator = _Validator(method, options)
    examples = list(validator.run(fp))
    return ValidationResult(report=validator.report(), examples=examples)


def iter_validate(
    fp: BinaryIO, *, method: Literal["supervised", "dpo"], options: ValidationOptions
) -> tuple[Iterator[Example], Callable[[], Report]]:
    """Streaming form: (usable examples as they are validated, a function giving the report).

    Call the report function after the iterator is exhausted.
    """
    validator = _Validator(method, options)
    return validator.run(fp), validator.report


# ---------------------------------------------------------------------------- images


@dataclass
class _Resolved:
    data: bytes
    info: ImageInfo


@dataclass
class _Draft:
    line: int
    build: Callable[[dict], Example]
    images: list[tuple[str, str]] = field(default_factory=list)


class _Validator:
    def __init__(self, method: str, options: ValidationOptions) -> None:
        if method not in ("supervised", "dpo"):
            raise ValueError(f"unknown method {method!r}; use 'supervised' or 'dpo'")
        self.method = method
        self.options = options
        self.moderator = options.moderator or default_moderator()
        self.control_tokens = tuple(
            DEFAULT_CONTROL_TOKENS if options.control_tokens is None else options.control_tokens
        )
        self.counter = options.token_counter or estimate_tokens
        self.tokens = TokenStats("model" if options.token_counter else "estimate")
        self.issues: list[Issue] = []
        self.examples = 0
        self.usable = 0
        self.skipped = 0
        self.with_images = 0
        self.images = 0
        self.seen: dict[bytes, int] = {}  # example digest -> first line (duplicates)
        # sha256 -> decode + moderation verdict, shared by every validation with this moderator.
        self.verdicts = verdicts_for(self.moderator)
        self.decode_max_pixels = min(
            DECODE_MAX_PIXELS, getattr(self.moderator, "decode_max_pixels", DECODE_MAX_PIXELS)
        )
        self.sunk: set[str] = set()
        self.legacy_warned = False
        self.judging = threading.BoundedSemaphore(available_cores())

    # -- the loop

    def run(self, fp: BinaryIO) -> Iterator[Example]:
        pending: list[_Draft] = []
        with ThreadPoolExecutor(_FETCH_THREADS) as pool, make_client(self.options.fetch_timeout) as client:
            self.pool, self.client = pool, client
            for line, record, error in read_jsonl(fp):
                self.examples += 1
                if error is not None:
                    self._add(Issue(line, "", "invalid_json", "error", f"{error}"))
                else:
                    draft = self._check(line, record)
                    if draft is not None:
                        pending.append(draft)
                if self.examples % _CHUNK == 0:
                    yield from self._flush(pending)
                    pending = []
                    self._progress()
            yield from self._flush(pending)
            self._progress()

    def _progress(self) -> None:
        if self.options.progress is not None:
            self.options.progress(self.examples)

    def _add(self, issue: Issue) -> None:
        self.issues.append(issue)

    def _check(self, line: int, record: dict) -> _Draft | None:
        if self.method == "supervised":
            record, converted = upgrade_functions(record)
            if converted and not self.legacy_warned:  # one warning per file, at the first such line
                self.legacy_warned = True
                self._add(Issue(line, "", LEGACY_CODE, "warning", LEGACY_MESSAGE))
        ck = LineCheck(line, self.control_tokens)
        try:
            build = (check_chat if self.method == "supervised" else check_preference)(record, ck)
        except RecursionError:
            ck.error("", "invalid_structure", "the example is nested too deeply; flatten it")
            build = None
        if build is not None and len(ck.images) > MAX_IMAGES_PER_EXAMPLE:
            ck.error(
                "messages" if self.method == "supervised" else "input.messages",
                "too_many_images",
                f"the example has {len(ck.images)} images; the limit is {MAX_IMAGES_PER_EXAMPLE}, "
                "so split it into several examples",
            )
        self.issues.extend(ck.issues)
        if build is None or ck.failed:
            return None
        if ck.images:
            self.with_images += 1
            self.images += len(ck.images)
            if self.with_images == MAX_IMAGE_EXAMPLES + 1:
                self._add(
                    Issue(
                        line,
                        "",
                        "too_many_image_examples",
                        "error",
                        f"the file has more than {MAX_IMAGE_EXAMPLES:,} examples with images (the limit); "
                        "split it into several files or jobs",
                    )
                )
            if self.with_images > MAX_IMAGE_EXAMPLES:
                return None
        self._check_duplicate(line, record)
        return _Draft(line, build, ck.images)

    def _check_duplicate(self, line: int, record: dict) -> None:
        try:
            canonical = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
        except (RecursionError, ValueError):
            return
        digest = hashlib.blake2b(canonical, digest_size=16).digest()
        first = self.seen.setdefault(digest, line)
        if first != line:
            self._add(
                Issue(
                    line,
                    "",
                    "duplicate_example",
                    "warning",
                    f"this example is identical to line {first}; remove one unless the repetition is intended",
                )
            )

    def _flush(self, pending: list[_Draft]) -> Iterator[Example]:
        urls = list(dict.fromkeys(url for d in pending for _, url in d.images))
        resolved = dict(zip(urls, self.pool.map(self._resolve, urls), strict=True))
        for draft in pending:
            failures = [
                (path, resolved[url])
                for path, url in draft.images
                if isinstance(resolved[url], ImageRejected)
            ]
            if failures:
                self.skipped += 1
                for path, rejected in failures:
                    self._add(Issue(draft.line, path, rejected.code, "skip", _skip_message(rejected)))
                continue
            example = draft.build(resolved)
            if not self._count_tokens(draft.line, example):
                self.skipped += 1
                continue
            self._sink(example)
            self.usable += 1
            yield example

    def _resolve(self, url: str) -> _Resolved | ImageRejected:
        """Bytes, decode and moderation of one image; runs on the pool, never raises ImageRejected."""
        try:
            data = fetch_image_bytes(
                url,
                allow_private_networks=self.options.allow_private_networks,
                timeout=self.options.fetch_timeout,
                client=self.client,
            )
            digest = hashlib.sha256(data).hexdigest()
            verdict = self.verdicts.get(digest)
            if verdict is None:
                with self.judging:
                    verdict = self._judge(data)
                self.verdicts.put(digest, verdict)
            if isinstance(verdict, ImageRejected):
                return verdict
            return _Resolved(data, verdict)
        except ImageRejected as rejected:
            return rejected

    def _judge(self, data: bytes) -> ImageInfo | ImageRejected:
        try:
            # Still a full check of the data; only the pixels kept are fewer where the moderator
            # says it needs no more (JPEG then decodes at 1/2-1/8 scale).
            info, image = decode_image(data, max_pixels=self.decode_max_pixels)
        except ImageRejected as rejected:
            return rejected
        with image:
            result = self.moderator.moderate(image)
        for category in _MODERATION_ORDER:
            if category in result.flagged:
                score = result.scores.get(category, 1.0)
                return ImageRejected(
                    SKIP_CODE[category],
                    f"the image appears to contain {SKIP_PHRASE[category]} (score {score:.2f}); images with "
                    "people, faces, children or CAPTCHAs cannot be trained on, so remove it",
                )
        return info

    def _sink(self, example: Example) -> None:
        if self.options.image_sink is None:
            return
        for image in example.images:
            if image.sha256 not in self.sunk and image.data is not None:
                self.sunk.add(image.sha256)
                self.options.image_sink(image.sha256, image.data)

    def _count_tokens(self, line: int, example: Example) -> bool:
        """Count the example's tokens; False (and a skip issue) if the model cannot train on it:
        its chat template refuses the conversation, or truncation leaves nothing to train on."""
        try:
            counted = self.counter(example)
        except InvalidRequest as exc:
            self._add(Issue(line, exc.param or "", exc.code or "invalid_example", "skip", exc.message))
            return False
        n, trained = counted if isinstance(counted, TokenCount) else (int(counted), None)
        self.tokens.add(n, trained)
        limit = self.options.max_tokens
        if limit and n > limit:
            self._add(
                Issue(
                    line,
                    "",
                    "example_too_long",
                    "warning",
                    f"the example has {n:,} tokens, more than the length limit of {limit:,}; it will be "
                    "truncated from the end to the limit, so shorten it, split it or raise the limit",
                )
            )
        return True

    # -- the report

    def report(self) -> Report:
        minimum = self.options.min_examples
        file_level: list[Issue] = []
        if self.usable < minimum:
            file_level.append(
                Issue(
                    0,
                    "",
                    "too_few_examples",
                    "error",
                    f"the file has {self.usable} usable example(s) ({self.examples} in all, {self.skipped} "
                    f"skipped); at least {minimum} are needed, so add more examples",
                )
            )
        issues = sorted(self.issues + file_level, key=lambda i: (i.line <= 0, i.line))
        errors = sum(1 for i in issues if i.severity == "error")
        summary = Summary(
            examples=self.examples,
            usable_examples=self.usable,
            examples_with_images=self.with_images,
            images=self.images,
            skipped_examples=self.skipped,
            errors=errors,
            tokens=self.tokens.summary(self.options.max_tokens),
        )
        return Report(ok=errors == 0, method=self.method, summary=summary, issues=issues)


def _skip_message(rejected: ImageRejected) -> str:
    return f"{rejected.message}. The example is left out of training."


__all__ = [
    "DEFAULT_CONTROL_TOKENS",
    "Severity",
    "ValidationOptions",
    "ValidationResult",
    "iter_validate",
    "validate_file",
]
