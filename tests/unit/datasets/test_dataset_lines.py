import io

from openft.datasets.lines import read_jsonl, scan_jsonl


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
