"""Id minting with OpenAI's prefixes (files ``file-``, jobs ``ftjob-``, checkpoints ``ftckpt_``...)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def _token(n: int = 24) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def file_id() -> str:
    return f"file-{_token()}"


def job_id() -> str:
    return f"ftjob-{_token()}"


def event_id() -> str:
    return f"ftevent-{_token()}"


def checkpoint_id() -> str:
    return f"ftckpt_{_token()}"


def chat_completion_id() -> str:
    return f"chatcmpl-{_token(29)}"


def project_id() -> str:
    return f"proj_{_token(16)}"


def api_key() -> str:
    return f"sk-openft-{_token(40)}"


def fine_tuned_model_name(*, base: str, project: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<project>:<suffix>:<job-id-tail>``, as OpenAI names them (empty suffix allowed)."""
    return f"ft:{base}:{project}:{suffix or ''}:{job_id.removeprefix('ftjob-')[-8:]}"


def checkpoint_model_name(model_name: str, step: int) -> str:
    return f"{model_name}:ckpt-step-{step}"
