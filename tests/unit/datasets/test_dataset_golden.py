"""Golden reports: each ``tests/golden/datasets/<case>.jsonl`` against its ``.expected.json``.

After an intended change, regenerate with ``python tests/golden/datasets/make_golden.py
--expected-only`` and review the diff.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from openft.datasets.report import ERROR_CODES, SKIP_CODES, WARNING_CODES

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "datasets"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


@pytest.mark.parametrize("case", sorted(make_golden.CASES))
def test_golden(case: str) -> None:
    expected = json.loads((GOLDEN / f"{case}.expected.json").read_text())
    assert make_golden.run_case(case) == expected


def test_clean_cases_raise_nothing() -> None:
    for case in ("clean_supervised", "clean_dpo", "clean_images"):
        report = make_golden.run_case(case)
        assert report["ok"] and report["issues"] == [], case


def test_mixed_cases_cover_every_code() -> None:
    seen = set()
    for case in ("mixed_supervised", "mixed_dpo"):
        seen |= {i["code"] for i in make_golden.run_case(case)["issues"]}
    assert seen == set(ERROR_CODES) | set(SKIP_CODES) | set(WARNING_CODES)
