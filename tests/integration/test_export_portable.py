"""`openft export` writes a folder that can be moved to another machine: plain files with
ordinary modes, no links, and no absolute path of this machine in any file."""

from __future__ import annotations

import io
import json
import shutil
import stat

import pytest

from tests.integration.test_service_e2e import wait_for
from tests.tasks import colour_examples, to_jsonl

pytestmark = pytest.mark.slow


def test_export_folders_are_portable(full_server, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    c = full_server.client("portable")
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(24, seed=8)))), purpose="fine-tune"
    )
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model="openft-tiny-vlm",
        hyperparameters={"n_epochs": 1},
        extra_body={"openft": {"training_type": "lora"}},
    )
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error

    local = [str(full_server.home), full_server.env["OPENFT_MODEL_CACHE"], str(tmp_path)]
    for name, extra in (("adapter", []), ("merged", ["--merged"])):
        target = tmp_path / name
        out = full_server.cli("export", job.fine_tuned_model, "--to", str(target), "--json", *extra)
        assert out.returncode == 0, out.stderr
        listing = json.loads(out.stdout)
        assert listing["path"] == str(target) and listing["merged"] == bool(extra)
        found = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
        assert listing["files"] == found and found
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        for path in target.rglob("*"):
            assert not path.is_symlink(), path
            assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
            if path.suffix in (".json", ".jinja", ".txt"):
                text = path.read_text()
                assert not [p for p in local if p in text], (path, text[:500])
        if not extra:
            assert json.loads((target / "adapter_config.json").read_text())["base_model_name_or_path"] == (
                "openft-tiny-vlm"
            )
            assert json.loads((target / "openft.json").read_text()) == {
                "kind": "adapter",
                "base_model": "openft-tiny-vlm",
            }

    # The merged folder, moved elsewhere, still loads and answers with plain transformers.
    moved = shutil.move(tmp_path / "merged", tmp_path / "elsewhere")
    tok = AutoTokenizer.from_pretrained(moved)
    model = AutoModelForImageTextToText.from_pretrained(moved).eval()
    messages = [{"role": "user", "content": "Colour of the old grass far?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    served = c.chat.completions.create(
        model=job.fine_tuned_model, messages=messages, temperature=0, max_tokens=4
    )
    plain = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert plain == served.choices[0].message.content
