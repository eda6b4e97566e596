"""The validation report: every issue found in a training file plus a summary.

Three severities, after the vision guide's split between a file that cannot be trained on
and images that are merely left out:

- ``error``: the file is not trainable (bad JSON, bad structure, too few examples, ...).
- ``skip``: one example is left out of training (an image with a face, an unreachable URL,
  ...); the job goes on with the rest.
- ``warning``: worth knowing, changes nothing (duplicates, examples that will be truncated).

Codes are stable: clients and the worker match on them, so never rename one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "skip", "warning"]

# Stable issue codes, by severity. Add new ones; never rename or reuse.
ERROR_CODES: tuple[str, ...] = (
    "invalid_json",
    "invalid_structure",
    "invalid_role",
    "missing_assistant_message",
    "image_in_assistant_message",
    "too_many_images",
    "too_many_image_examples",
    "invalid_detail",
    "invalid_preference_example",
    "too_few_examples",
    "control_token_in_content",
)
SKIP_CODES: tuple[str, ...] = (
    "contains_people",
    "contains_faces",
    "contains_children",
    "contains_captcha",
    "inaccessible_url",
    "image_too_large",
    "invalid_image_format",
)
WARNING_CODES: tuple[str, ...] = (
    "example_too_long",
    "duplicate_example",
)


@dataclass
class Issue:
    """One problem, pinned to a 1-based line (0 = the file as a whole) and a JSON field path."""

    line: int
    field: str
    code: str
    severity: Severity
    message: str


@dataclass(frozen=True)
class TokenSummary:
    """Tokens per usable example (image tokens included); the numbers are None for an empty file."""

    source: str
    """``model`` (the model's processor counted) or ``estimate`` (no processor given)."""
    total: int | None
    min: int | None
    mean: float | None
    max: int | None
    p50: int | None
    p95: int | None
    """Nearest-rank percentiles."""
    trained_tokens_per_epoch: int
    """What one epoch trains on: each example capped at the model's context."""
    trained_max: int | None = None
    """The most trained (labelled) tokens in one sequence, before truncation (the model's counter
    only; None for an estimate). The memory planner sizes a labelled-positions loss with it."""


@dataclass(frozen=True)
class Summary:
    """The counts of a validation report; travels typed to the worker and the training plan."""

    examples: int
    usable_examples: int
    examples_with_images: int
    images: int
    skipped_examples: int
    errors: int
    tokens: TokenSummary

    def to_dict(self) -> dict[str, Any]:
        """For storage, events and ``openft validate --json`` (the stable report shape)."""
        return asdict(self)


@dataclass
class Report:
    """What ``validate_file`` found. ``ok`` means trainable: no errors, enough usable examples."""

    ok: bool
    method: str
    summary: Summary
    issues: list[Issue] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "method": self.method,
            "summary": self.summary.to_dict(),
            "issues": [asdict(i) for i in self.issues],
        }

    def first_error(self) -> Issue | None:
        return next((i for i in self.issues if i.severity == "error"), None)

    def counts_by_code(self) -> dict[str, int]:
        """Issue counts per code, most frequent first (for summaries and job events)."""
        return dict(Counter(i.code for i in self.issues).most_common())

    def error_message(self) -> str:
        """One sentence for ``job.error.message``: where the first error is and what to do."""
        issue = self.first_error()
        if issue is None:
            return "The training file is valid."
        errors = sum(1 for i in self.issues if i.severity == "error")
        more = f" ({errors - 1} more error(s) in the file)" if errors > 1 else ""
        return f"{location(issue)}: {issue.message}{more}"


def location(issue: Issue) -> str:
    """``Line 3, messages[1].role`` / ``Line 3`` / ``Training file``."""
    if issue.line <= 0:
        return "Training file"
    return f"Line {issue.line}, {issue.field}" if issue.field else f"Line {issue.line}"
