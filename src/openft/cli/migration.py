"""Move fine-tuning files and jobs from one OpenAI-wire server to another, through the openai SDK only.

``plan()`` reads both sides and decides, per source file and job, what a run would do;
``execute()`` does it. Both take SDK clients, so the same code runs against OpenAI itself,
another openft, or recorded responses in tests.

How a re-run recognises what an earlier (possibly interrupted) run already did:

* Jobs carry ``metadata[openft_migrated_from] = <source job id>`` on the destination. A job is
  created in one request, so it either exists with that key or not at all.
* Files have no metadata in OpenAI's API, so a copy is recognised by its content: same
  filename, same size and the same sha256. The content *is* the record, so there is no window
  between "uploaded" and "recorded" (a ledger written after the upload would have one, and a
  local ledger is lost when the migration is re-run from another machine or the destination
  is wiped). Hashing costs a download, so it is done only for destination files whose name and
  size already match, and skipped for files a migrated job already links (the source job's
  training file *is* the destination job's training file; we verified it when we made it).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from openft.cli.remote import describe_api_error
from openft.cli.results_csv import final_metrics, read_results_csv
from openft.cli.transfer import (
    Progress,
    TransferError,
    copy_file,
    download,
    hash_remote,
    paginate,
    upload,
    with_retries,
)

if TYPE_CHECKING:
    from openai import OpenAI

MIGRATED_FROM = "openft_migrated_from"
"""Destination job metadata: the source job it re-creates."""
SOURCE_RESULTS = "openft_source_results"
"""Destination job metadata: the destination file id of the source job's results CSV."""
SOURCE_METRICS = "openft_source_metrics"
"""Destination job metadata: the source job's final metrics, compact JSON."""
OUR_KEYS = (MIGRATED_FROM, SOURCE_RESULTS, SOURCE_METRICS)
MAX_METADATA_KEYS = 16
"""OpenAI's (and openft's) limit on metadata keys per job."""
RESULTS_PURPOSE = "user_data"  # "fine-tune-results" is server-made; clients cannot upload it
METHODS = ("supervised", "dpo")


# ---------------------------------------------------------------- the plan


@dataclass
class FileStep:
    source: dict[str, Any]
    action: Literal["copy", "present"]
    dest_id: str | None = None
    how: str = ""
    """Why a file counts as present: ``linked`` (by a migrated job) or ``sha256``."""

    def to_json(self) -> dict[str, Any]:
        s = self.source
        return {
            "source_id": s["id"],
            "filename": s["filename"],
            "bytes": s["bytes"],
            "action": self.action,
            "dest_id": self.dest_id,
            **({"matched_by": self.how} if self.how else {}),
        }


@dataclass
class JobStep:
    source: dict[str, Any]
    action: Literal["create", "present", "skip"]
    method: str
    model: str | None = None
    """Destination base model (mapped)."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    dest_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def source_id(self) -> str:
        return str(self.source["id"])

    def to_json(self) -> dict[str, Any]:
        s = self.source
        return {
            "source_id": s["id"],
            "status": s.get("status"),
            "action": self.action,
            "method": self.method,
            "source_model": s.get("model"),
            "model": self.model,
            "hyperparameters": self.hyperparameters,
            "suffix": s.get("user_provided_suffix"),
            "seed": s.get("seed"),
            "metadata": s.get("metadata"),
            "training_file": s.get("training_file"),
            "validation_file": s.get("validation_file"),
            "reason": self.reason or None,
            "dest_id": self.dest_id,
            "notes": self.notes,
        }


@dataclass
class Plan:
    files: list[FileStep]
    jobs: list[JobStep]

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files], "jobs": [j.to_json() for j in self.jobs]}


class SourceAccessError(Exception):
    """The source refused the key (401/403): nothing can be read."""


def method_of(job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The job's method type and its hyperparameters as the source reports them.

    Jobs made before OpenAI added ``method`` carry only the top-level ``hyperparameters``:
    they are supervised.
    """
    method = job.get("method") or {}
    kind = str(method.get("type") or "supervised")
    hp = ((method.get(kind) or {}).get("hyperparameters")) or job.get("hyperparameters") or {}
    return kind, {k: v for k, v in hp.items() if v is not None}


def parse_model_map(pairs: Iterable[str]) -> dict[str, str]:
    """``SRC=DST`` pairs as a dict; raises ``ValueError`` naming the bad pair."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"--model-map {pair!r}: expected SOURCE_MODEL=DESTINATION_MODEL")
        mapping[src.strip()] = dst.strip()
    return mapping


def plan(
    src: OpenAI,
    dst: OpenAI,
    *,
    model_map: dict[str, str],
    statuses: set[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Plan:
    """Read both sides and decide what to copy; changes nothing (except hashing reads)."""
    import openai

    try:
        src_files = [
            f
            for f in paginate(lambda: src.files.list(purpose="fine-tune", limit=100), sleep=sleep)
            if f.get("purpose") == "fine-tune"
        ]
        all_jobs = list(paginate(lambda: src.fine_tuning.jobs.list(limit=100), sleep=sleep))
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise SourceAccessError(
            f"the source refused the key ({e.status_code}): {describe_api_error(e)}. "
            "Check --from-api-key: it needs read access to Files and Fine-tuning "
            "(a restricted OpenAI key must allow both)."
        ) from e
    # Oldest first, as they were made (the API lists newest first; the sort is stable within a second).
    all_jobs.sort(key=lambda j: j.get("created_at") or 0, reverse=True)
    all_jobs.reverse()
    src_jobs = [j for j in all_jobs if not statuses or j.get("status") in statuses]

    dst_files = list(paginate(lambda: dst.files.list(limit=100), sleep=sleep))
    dst_jobs = list(paginate(lambda: dst.fine_tuning.jobs.list(limit=100), sleep=sleep))
    dst_models = {m["id"] for m in paginate(dst.models.list, sleep=sleep)}
    migrated = {(j.get("metadata") or {}).get(MIGRATED_FROM): j for j in dst_jobs}
    migrated.pop(None, None)

    files = _plan_files(src, dst, src_files, all_jobs, dst_files, migrated)
    known_files = {f["id"] for f in src_files}
    # A job that continues a fine-tuned model continues its copy here, once that copy has trained.
    parents = {j["fine_tuned_model"]: j["id"] for j in all_jobs if j.get("fine_tuned_model")}
    continued = {
        model: migrated[parent]["fine_tuned_model"]
        for model, parent in parents.items()
        if parent in migrated and migrated[parent].get("fine_tuned_model")
    }
    model_map = {**continued, **model_map}
    jobs = [_plan_job(job, migrated, model_map, dst_models, known_files, parents) for job in src_jobs]
    return Plan(files=files, jobs=jobs)


class _DestFiles:
    """Destination files by (filename, size); each one hashed at most once, and only when asked."""

    def __init__(self, dst: OpenAI, files: Iterable[dict[str, Any]]) -> None:
        self._dst = dst
        self._by_key: dict[tuple[str, int], list[str]] = {}
        self._sha: dict[str, str] = {}
        for f in files:
            self._by_key.setdefault((f["filename"], int(f["bytes"])), []).append(f["id"])

    def has(self, filename: str, size: int) -> bool:
        return (filename, size) in self._by_key

    def find(self, filename: str, size: int, digest: str) -> str | None:
        for file_id in self._by_key.get((filename, size), []):
            if file_id not in self._sha:
                self._sha[file_id] = hash_remote(self._dst, file_id)
            if self._sha[file_id] == digest:
                return file_id
        return None


def _plan_files(
    src: OpenAI,
    dst: OpenAI,
    src_files: list[dict[str, Any]],
    src_jobs: list[dict[str, Any]],
    dst_files: list[dict[str, Any]],
    migrated: dict[str, dict[str, Any]],
) -> list[FileStep]:
    dst_ids = {f["id"] for f in dst_files}
    # A migrated job links its source's files to the copies made for it.
    linked: dict[str, str] = {}
    for job in src_jobs:
        copy = migrated.get(job["id"])
        for key in ("training_file", "validation_file"):
            if copy and job.get(key) and copy.get(key) in dst_ids:
                linked[job[key]] = copy[key]
    twins = _DestFiles(dst, (f for f in dst_files if f.get("purpose") == "fine-tune"))
    steps = []
    for f in src_files:
        if f["id"] in linked:
            steps.append(FileStep(f, "present", linked[f["id"]], "linked"))
            continue
        match = None
        if twins.has(f["filename"], f["bytes"]):
            match = twins.find(f["filename"], f["bytes"], hash_remote(src, f["id"]))
        steps.append(FileStep(f, "present", match, "sha256") if match else FileStep(f, "copy"))
    return steps


def _plan_job(
    job: dict[str, Any],
    migrated: dict[str, dict[str, Any]],
    model_map: dict[str, str],
    dst_models: set[str],
    known_files: set[str],
    parents: dict[str, str],
) -> JobStep:
    kind, hp = method_of(job)
    step = JobStep(job, "create", kind, hyperparameters=hp)
    if job.get("integrations"):
        step.notes.append("integrations are not copied")
    if job["id"] in migrated:
        step.action, step.dest_id = "present", migrated[job["id"]]["id"]
        step.model = migrated[job["id"]].get("model")
        return step
    if kind not in METHODS:
        return _skip(step, f"{kind} fine-tuning is not supported yet (supervised and dpo are)")
    source_model = str(job.get("model"))
    target = model_map.get(source_model) or (source_model if source_model in dst_models else None)
    if target is None and source_model in parents:
        return _skip(
            step,
            f"it continues {source_model!r}, made by source job {parents[source_model]}: run again once "
            "that job's copy has trained here, or pass --model-map",
        )
    if target is None:
        return _skip(
            step,
            f"no mapping for model {source_model!r}: pass --model-map {source_model}=<destination model>",
        )
    if target not in dst_models:
        return _skip(step, f"--model-map maps {source_model!r} to {target!r}, which the destination lacks")
    step.model = target
    for key in ("training_file", "validation_file"):
        if job.get(key) and job[key] not in known_files:
            return _skip(step, f"its {key} {job[key]} is no longer on the source")
    metadata = job.get("metadata") or {}
    clash = [k for k in OUR_KEYS if k in metadata]
    if clash:
        return _skip(step, f"its metadata already uses {clash[0]!r}, which openft migrate writes")
    if len(metadata) >= MAX_METADATA_KEYS:
        return _skip(step, f"its metadata has {len(metadata)} keys: no room for {MIGRATED_FROM!r}")
    return step


def _skip(step: JobStep, reason: str) -> JobStep:
    step.action, step.reason = "skip", reason
    return step


# ---------------------------------------------------------------- doing it


@dataclass
class Result:
    files_copied: int = 0
    jobs_created: int = 0
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "files_copied": self.files_copied,
            "jobs_created": self.jobs_created,
            "failures": self.failures,
        }


def execute(src: OpenAI, dst: OpenAI, the_plan: Plan, progress: Progress | None = None) -> Result:
    """Copy the files marked ``copy``, then create the jobs marked ``create``; fills in ``dest_id``.

    A failure on one job (or file) is recorded and the rest go on; the run can simply be repeated.
    """
    import openai

    progress = progress or Progress()
    result = Result()
    file_map: dict[str, str] = {}
    results_copies: list[_DestFiles] = []  # made on first use: most sources have few results
    for step in the_plan.files:
        if step.action == "copy":
            try:
                step.dest_id = copy_file(src, dst, step.source, purpose="fine-tune", progress=progress)
            except (openai.APIError, TransferError) as e:
                result.failures.append(f"file {step.source['id']}: {describe_api_error(e)}")
                continue
            result.files_copied += 1
        if step.dest_id:
            file_map[step.source["id"]] = step.dest_id
    for job_step in the_plan.jobs:
        if job_step.action != "create":
            continue
        try:
            missing = [
                job_step.source[k]
                for k in ("training_file", "validation_file")
                if job_step.source.get(k) and job_step.source[k] not in file_map
            ]
            if missing:
                raise TransferError(f"its file {missing[0]} was not copied")
            if not results_copies:
                listed = paginate(lambda: dst.files.list(purpose=RESULTS_PURPOSE, limit=100))
                results_copies.append(_DestFiles(dst, listed))
            job_step.dest_id = _create_job(src, dst, job_step, file_map, results_copies[0], progress)
        except (openai.APIError, TransferError) as e:
            job_step.reason = describe_api_error(e)
            result.failures.append(f"job {job_step.source_id}: {job_step.reason}")
            continue
        result.jobs_created += 1
    return result


def _create_job(
    src: OpenAI,
    dst: OpenAI,
    step: JobStep,
    file_map: dict[str, str],
    results_copies: _DestFiles,
    progress: Progress,
) -> str:
    import openai

    job = step.source
    metadata = {**(job.get("metadata") or {}), MIGRATED_FROM: step.source_id}
    room = MAX_METADATA_KEYS - len(metadata)
    if job.get("result_files") and room < 1:
        step.notes.append("results CSV not copied: the metadata has no room to point at it")
    elif job.get("result_files"):
        try:
            metadata.update(_carry_results(src, dst, job, results_copies, room=room, progress=progress))
        except (openai.APIError, TransferError) as e:  # the job still moves; its old curve is a bonus
            step.notes.append(f"results CSV not copied: {describe_api_error(e)}")
    optional: dict[str, Any] = {}
    if job.get("validation_file"):
        optional["validation_file"] = file_map[job["validation_file"]]
    if job.get("user_provided_suffix"):
        optional["suffix"] = job["user_provided_suffix"]
    if job.get("seed") is not None:
        optional["seed"] = job["seed"]
    # Hyperparameters go only under ``method`` (the top-level field is deprecated, and a
    # destination may refuse both at once).
    created = dst.fine_tuning.jobs.create(
        model=str(step.model),
        training_file=file_map[job["training_file"]],
        method={"type": step.method, step.method: {"hyperparameters": step.hyperparameters}},  # type: ignore[misc]
        metadata=metadata,
        **optional,
    )
    return created.id


def _carry_results(
    src: OpenAI,
    dst: OpenAI,
    job: dict[str, Any],
    copies: _DestFiles,
    *,
    room: int,
    progress: Progress,
) -> dict[str, str]:
    """Copy the source job's results CSV to the destination; metadata keys pointing at it.

    The copy is a ``user_data`` file named ``<source job>_results.csv``. Like training files it
    is recognised by name, size and sha256, so an interrupted run does not upload it twice.
    """
    name = f"{job['id']}_results.csv"
    with tempfile.TemporaryDirectory(prefix="openft-migrate-") as tmp:
        path = Path(tmp) / "results.csv"
        size, digest = with_retries(lambda: download(src, job["result_files"][0], path))
        dest_id = copies.find(name, size, digest) or upload(dst, path, name, RESULTS_PURPOSE, progress)
        keys = {SOURCE_RESULTS: dest_id}
        # results CSVs are small (a row per step): read whole to find the last values
        metrics = final_metrics(read_results_csv(path.read_bytes()), job)
        if metrics and room >= 2:
            keys[SOURCE_METRICS] = metrics
    return keys
