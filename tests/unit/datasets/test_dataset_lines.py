import io

import pytest

from openft.datasets.lines import MAX_JSON_DEPTH, JsonlScanner, read_jsonl, scan_jsonl


def test_scan_counts_records_and_finds_first_error() -> None:
    data = b'{"a": 1}\n\n   \n{"b": 2}\n[1]\n{bad\n'
    scan = scan_jsonl(io.BytesIO(data))
    assert scan.lines == 4
    assert scan.first_error is not None
    line, message = scan.first_error
    assert line == 5 and "JSON object" in message


def test_read_keeps_physical_line_numbers_and_reports_bad_lines() -> None:
    data = '\ufeff{"a": 1}\n\n{"b": NaN}\n\xff\n'.encode() + b"\xff\xfe\n" + b'{"c": 3}'
    rows = list(read_jsonl(io.BytesIO(data)))
    assert rows[0] == (1, {"a": 1}, None)  # BOM accepted
    assert rows[1][0] == 3 and rows[1][1] is None and "NaN" in rows[1][2]
    assert rows[2][0] == 4 and rows[2][1] is None and "not valid JSON" in rows[2][2]
    assert rows[3][0] == 5 and "UTF-8" in rows[3][2]
    assert rows[4] == (6, {"c": 3}, None)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    line = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    [(n, record, error)] = list(read_jsonl(io.BytesIO(line)))
    assert n == 1 and record is None and error


def test_a_line_over_the_limit_is_reported_without_holding_it() -> None:
    data = b'{"a": 1}\n' + b'{"b": "' + b"x" * 5000 + b'"}\n' + b'{"c": 3}'
    rows = list(read_jsonl(io.BytesIO(data), max_line_bytes=1000))
    assert rows[0] == (1, {"a": 1}, None)
    assert rows[1][0] == 2 and rows[1][1] is None and "1000-byte limit" in rows[1][2]
    assert rows[2] == (3, {"c": 3}, None)  # reading goes on after the long line


def test_nesting_over_the_limit_is_an_error_naming_the_depth() -> None:
    deep = b'{"a": ' + b"[" * (MAX_JSON_DEPTH + 5) + b"]" * (MAX_JSON_DEPTH + 5) + b"}"
    ok = b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    [(_, bad_record, error), (_, good, no_error)] = list(read_jsonl(io.BytesIO(deep + b"\n" + ok)))
    assert bad_record is None and f"{MAX_JSON_DEPTH + 6} levels" in error
    assert good is not None and no_error is None


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096])
def test_the_streaming_scanner_agrees_with_the_reader_for_any_chunking(chunk: int) -> None:
    data = '\ufeff{"a": 1}\n\n  \n[1]\r\n{"b": 2}\n{"long": "'.encode() + b"y" * 300 + b'"}\n{"c": 3}'
    scanner = JsonlScanner(max_line_bytes=200)
    for i in range(0, len(data), chunk):
        scanner.feed(data[i : i + chunk])
    scan = scanner.finish()
    rows = list(read_jsonl(io.BytesIO(data), max_line_bytes=200))
    assert scan.lines == len(rows) == 5
    first_bad = next((n, e) for n, _, e in rows if e)
    assert scan.first_error == first_bad == (4, scan.first_error[1])
    assert scan_jsonl(io.BytesIO(data), max_line_bytes=200) == scan
