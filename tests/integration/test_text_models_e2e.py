"""Text-only chat models through the real stack: ``openft serve`` + the openai SDK.

Per chat format (Llama 3, ChatML, Qwen3, Gemma, Mistral, Phi-3) a tiny random model of the real
architecture (:mod:`openft.models.tiny_text`) is fine-tuned on the colour rule and answers
held-out prompts right, where its base is at chance. The models come from the catalog
(``OPENFT_BASE_MODELS`` as a JSON object), including an alias named like an OpenAI model; a
cookbook-style legacy function-calling file and a file with one 10,000-token example validate
and train with the same findings in ``openft validate --json`` and in the job's events.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from openft.models.tiny_text import FORMATS, ensure_tiny_text
from tests.conftest import Server, catalog_server, model_cache
from tests.integration.test_service_e2e import wait_for
from tests.tasks import COLOURS, colour_examples, function_calling_records, records_jsonl, to_jsonl

pytestmark = pytest.mark.slow

ALIAS = "gpt-4o-mini-2024-07-18"


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cache = model_cache() / "text"
    models = {f"tiny-{fmt}": ensure_tiny_text(fmt, cache) for fmt in FORMATS}
    models[ALIAS] = ensure_tiny_text("chatml", cache)
    with catalog_server(tmp_path_factory, models, options={ALIAS: {"max_length": 512}}) as server:
        yield server


SYSTEM = "Answer with a colour."


def answer(client, model: str, prompt: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
    text = out.choices[0].message.content or ""
    # Qwen3's template trains an empty reasoning block before the reply: served as
    # reasoning_content, never as content.
    assert "<think>" not in text and "</think>" not in text
    return text.strip()


def accuracy(client, model: str, pairs: list[tuple[str, str]]) -> float:
    return sum(answer(client, model, p) == a for p, a in pairs) / len(pairs)


def held_out(train: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen = {p for p, _ in train}
    pairs = [(p, a) for p, a in colour_examples(60, seed=999) if p not in seen][:40]
    assert len(pairs) >= 30
    return pairs


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fine_tuned_text_model_learns_the_rule(text_server: Server, fmt: str) -> None:
    c = text_server.client(f"text-{fmt}")
    train = colour_examples(240, seed=1)
    f = c.files.create(file=("train.jsonl", io.BytesIO(to_jsonl(train, system=SYSTEM))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model=f"tiny-{fmt}",
        seed=3,
        hyperparameters={"n_epochs": 8, "batch_size": 8},
    )
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:tiny-{fmt}:")
    pairs = held_out(train)
    base = accuracy(c, f"tiny-{fmt}", pairs)
    tuned = accuracy(c, job.fine_tuned_model, pairs)
    assert base <= 1 / len(COLOURS) + 0.1, base  # chance or below
    assert tuned >= 0.9, (fmt, tuned)


def test_alias_job_embeds_the_alias_and_serves(text_server: Server) -> None:
    c = text_server.client("alias")
    assert ALIAS in {m.id for m in c.models.list()}
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(12, seed=5)))), purpose="fine-tune"
    )
    job = wait_for(
        c, c.fine_tuning.jobs.create(training_file=f.id, model=ALIAS, hyperparameters={"n_epochs": 1}).id
    )
    assert job.status == "succeeded", job.error
    assert job.model == ALIAS and job.fine_tuned_model.startswith(f"ft:{ALIAS}:alias:")
    events = [e for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
    limit = [e for e in events if e.message.startswith("Length limit")]
    assert limit and "512 tokens (the model catalog's max_length)" in limit[0].message
    out = c.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert out.model == job.fine_tuned_model


def _findings_agree(
    text_server: Server, tmp_path: Path, data: bytes, *, model: str, max_length: int | None
) -> tuple:
    """(validate --json report, the job's warning events): validate offline, then train."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    extra = ["--max-length", str(max_length)] if max_length else []
    cli = text_server.cli("validate", str(path), "--model", model, "--json", *extra)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    report = json.loads(cli.stdout)
    c = text_server.client("findings")
    f = c.files.create(file=("data.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model=model,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"openft": {"max_length": max_length}} if max_length else None,
    )
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=200))
    warned = {(e.data["line"], e.data["code"]) for e in events if e.data and "code" in e.data}
    found = {(i["line"], i["code"]) for i in report["issues"] if i["severity"] in ("warning", "skip")}
    return report, warned, found, events


def test_cookbook_function_calling_file_validates_and_trains(text_server: Server, tmp_path: Path) -> None:
    data = records_jsonl(function_calling_records(12, seed=0))
    report, warned, found, _ = _findings_agree(
        text_server, tmp_path, data, model="tiny-chatml", max_length=None
    )
    assert report["ok"] and report["summary"]["usable_examples"] == 12
    assert found == warned == {(1, "legacy_function_calling")}
    # The model's counter sees the tool definitions the template prints.
    assert report["summary"]["tokens"]["min"] > 500


def test_one_long_example_is_truncated_not_a_server_error(text_server: Server, tmp_path: Path) -> None:
    pairs = colour_examples(12, seed=6)
    records = [json.loads(line) for line in to_jsonl(pairs).decode().splitlines()]
    long_text = " ".join(["the small old red boat"] * 2000)  # ~10,000 tokens on the tiny tokenizer
    records[4]["messages"] = [
        {"role": "user", "content": "Repeat after me."},
        {"role": "assistant", "content": long_text},
    ]
    report, warned, found, events = _findings_agree(
        text_server, tmp_path, records_jsonl(records), model="tiny-llama3", max_length=2048
    )
    assert report["max_length"] == {"tokens": 2048, "source": "job"}
    assert report["summary"]["tokens"]["max"] >= 10_000
    assert found == warned == {(5, "example_too_long")}
    assert any("2,048 tokens (set on the job)" in e.message for e in events)


def test_dpo_job_and_merged_export_of_a_text_model(text_server: Server, tmp_path: Path) -> None:
    """DPO and export go through the same code for text models (Mistral: folded system, ``</s>``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tasks import preference_jsonl

    c = text_server.client("dpo")
    f = c.files.create(file=("p.jsonl", io.BytesIO(preference_jsonl(12, seed=2))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model="tiny-mistral",
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
    )
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error
    out = c.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "red the?"}], max_tokens=3
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    to = tmp_path / "merged"
    cli = text_server.cli("export", job.fine_tuned_model, "--to", str(to), "--merged")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    model, tok = AutoModelForCausalLM.from_pretrained(to), AutoTokenizer.from_pretrained(to)
    assert type(model).__name__ == "MistralForCausalLM" and tok.chat_template
