"""Load and fault run against a real ``openft serve``: ``python bench/load.py [--quick] [--json out.json]``.

Starts ``openft serve --workers 1`` on loopback (temporary ``OPENFT_HOME``, free port, its own
process group, a key from ``openft keys create``) and drives it with raw HTTP (httpx and plain
sockets, no SDK retries), so every 5xx, 429/503, timeout and dropped connection is counted as
the server gave it. Scenarios, each bounded in count and time and each with a flag to scale or
skip it:

1. ``--lists``: N concurrent ``GET /v1/fine_tuning/jobs``.
2. ``--uploads``: N concurrent 1 MiB ``purpose=fine-tune`` uploads of valid JSONL while a probe
   polls ``/healthz`` every 100 ms (the probe's p50/p99/max is the API's responsiveness).
3. ``--chats``: concurrent chats on ``openft-tiny-vlm`` (``8x64`` = 8 concurrent, max_tokens 64).
4. ``--abandon``: a non-streamed ``n=16`` chat dropped by the client after ~1 s, then the time
   a 1-token chat takes; the same for a streamed request.
5. Oversized bodies: a ``--chat-body-mb`` chat JSON body; a chunked (no Content-Length)
   ``--chunked-mb`` upload; a ``--no-newline-mb`` ``purpose=fine-tune`` upload with no newline.
   Bodies are generated while sending; sending stops as soon as the server answers or closes.
6. ``--kill``: SIGKILL of the server's process group at the first metrics/checkpoint event of a
   small job, restart on the same home, then: does the job finish, which steps ran twice, how
   many metrics events per step.
7. ``--nesting``: a chat whose ``tools[0].function.parameters`` is nested N levels deep.

Every row shows the server's RSS (API + workers, summed over the process tree) before, at its
peak during and after the scenario, and the disk used by the home (plus the server's TMPDIR,
where multipart parts are spooled) before and after. A scenario that leaves requests timed out
restarts the server (same home) so its leftover work does not bill the next scenario; the row
says so. The server's process group is always killed at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import Server, start_server  # noqa: E402  (a real `openft serve` on a free port)
from tests.tasks import colour_examples, to_jsonl  # noqa: E402

MODEL = "openft-tiny-vlm"
MiB = 1024 * 1024
PROMPT = [{"role": "user", "content": "Colour of the wet small sky one?"}]


# ---------------------------------------------------------------- results


@dataclass
class Outcome:
    """One request: ``code`` is the HTTP status, or ``timeout`` / ``conn`` / an exception name."""

    code: str
    seconds: float
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.code.startswith("2")


@dataclass
class Row:
    scenario: str
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    rss_mb: tuple[float, float, float] | None = None  # before, peak, after
    disk_mb: tuple[float, float, float] | None = None  # before, peak, after
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self.sent += 1
            self.latencies.append(o.seconds)
            if o.ok:
                self.ok += 1
            else:
                self.errors[o.code] += 1

    @property
    def n5xx(self) -> int:
        return sum(c for k, c in self.errors.items() if k.startswith("5"))

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(self.errors),
            "5xx": self.n5xx,
            "p50_s": pct(self.latencies, 0.5),
            "p99_s": pct(self.latencies, 0.99),
            "max_s": max(self.latencies) if self.latencies else None,
            "rss_mb_before_peak_after": self.rss_mb,
            "disk_mb_before_peak_after": self.disk_mb,
            "wall_s": self.wall_s,
            "notes": self.notes,
        }


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``None`` for no samples)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def lat_summary(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    return f"n={len(xs)} p50 {pct(xs, 0.5):.2f}s p99 {pct(xs, 0.99):.2f}s max {max(xs):.2f}s"


# ---------------------------------------------------------------- the server and its footprint


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (API + worker children), bytes; 0 if gone."""
    total = 0
    for p in server_tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def disk_usage(roots: tuple[Path, ...], pid: int | None) -> int:
    """Bytes allocated under the roots, plus files there that the server holds open after deleting
    them (Starlette spools multipart parts to anonymous temp files, which no directory walk sees)."""
    seen: dict[tuple[int, int], int] = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:  # a temp file removed while we walk
                    continue
                seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    prefixes = tuple(str(r) for r in roots)
    for proc in server_tree(pid):
        fd_dir = f"/proc/{proc.pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(f"{fd_dir}/{fd}").startswith(prefixes):
                    continue
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def server_tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class Sampler:
    """Background sampling of the server's RSS (every 0.2 s) and disk (every 1 s); peaks per window."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.rss_peak = 0
        self.disk_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.rss_peak = self.bench.rss()
        self.disk_peak = self.bench.disk()

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.2):
            self.rss_peak = max(self.rss_peak, self.bench.rss())
            tick += 1
            if tick % 5 == 0:
                self.disk_peak = max(self.disk_peak, self.bench.disk())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Bench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.home = root / "home"
        self.tmp = root / "server-tmp"  # the server's TMPDIR: multipart spools land here
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.server: Server | None = None
        self.key = ""
        self.http = httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        self.rows: list[Row] = []
        self.sampler: Sampler | None = None
        self.restarts = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> float:
        t = time.perf_counter()
        self.server = start_server(
            self.home,
            "--workers",
            str(self.args.workers),
            env={"TMPDIR": str(self.tmp), "OPENFT_LEASE_SECONDS": str(self.args.lease_seconds)},
            new_session=True,
        )
        took = time.perf_counter() - t
        if not self.key:
            out = self.server.cli("keys", "create", "--project", "bench")
            if out.returncode != 0:
                raise RuntimeError(f"openft keys create failed: {out.stderr}")
            self.key = out.stdout.strip()
        if self.sampler is None:
            self.sampler = Sampler(self)
        return took

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (API and workers), then reap."""
        if self.server is None:
            return
        proc = self.server.proc
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def stop(self) -> str:
        """SIGTERM, as a user's Ctrl-C would, bounded; then SIGKILL the group whatever is left."""
        if self.server is None:
            return "no server"
        proc = self.server.proc
        if proc.poll() is not None:
            note = f"server had already exited ({proc.returncode})"
        else:
            t = time.perf_counter()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=self.args.timeout)
                note = f"SIGTERM -> exit in {time.perf_counter() - t:.1f}s"
            except subprocess.TimeoutExpired:
                note = f"SIGTERM: still running after {self.args.timeout:.0f}s, killed"
            except ProcessLookupError:
                note = "server gone"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the API, if any
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(timeout=30)
        return note

    def restart(self, why: str, row: Row | None = None) -> None:
        self.kill()
        self.restarts += 1
        try:
            note = f"up in {self.start():.1f}s"
        except Exception as e:  # recorded; the next requests then fail as 'conn' and say so
            note = f"restart failed: {type(e).__name__}: {str(e)[:200]}"
        if row is not None:
            row.notes.append(f"server SIGKILLed and restarted on the same home ({why}; {note})")

    def alive(self, wait: float = 0.0) -> bool:
        end = time.perf_counter() + wait
        while True:
            if self.server is not None and self.server.proc.poll() is None:
                try:
                    if self.http.get(self.server.url + "/healthz", timeout=5).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
            if time.perf_counter() >= end:
                return False
            time.sleep(0.5)

    def rss(self) -> int:
        return tree_rss(self.server.proc.pid) if self.server else 0

    def disk(self) -> int:
        return disk_usage((self.home, self.tmp), self.server.proc.pid if self.server else None)

    # -- requests --------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Outcome:
        """One raw HTTP request, never raising: the status, or what went wrong."""
        headers = {"Authorization": f"Bearer {self.key}", **kw.pop("headers", {})}
        t = time.perf_counter()
        try:
            r = self.http.request(
                method, self.url + path, headers=headers, timeout=timeout or self.args.timeout, **kw
            )
            return Outcome(str(r.status_code), time.perf_counter() - t, r.content)
        except httpx.TimeoutException:
            return Outcome("timeout", time.perf_counter() - t)
        except httpx.TransportError:
            return Outcome("conn", time.perf_counter() - t)
        except Exception as e:  # the bench must survive any client-side surprise
            return Outcome(type(e).__name__, time.perf_counter() - t)

    def chat(self, body: dict[str, Any], timeout: float | None = None) -> Outcome:
        return self.request("POST", "/v1/chat/completions", json={"model": MODEL, **body}, timeout=timeout)

    # -- scenario bookkeeping --------------------------------------------------------

    @contextmanager
    def scenario(self, name: str) -> Iterator[Row]:
        row = Row(name)
        self.rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        if not self.alive(wait=self.args.timeout / 2):
            self.restart("it did not answer /healthz before the scenario", row)
        assert self.sampler is not None
        self.sampler.reset()
        rss0, disk0 = self.rss(), self.disk()
        t = time.perf_counter()
        try:
            yield row
        except Exception as e:  # a scenario's own failure is a result, not the end of the run
            row.notes.append(f"bench error: {type(e).__name__}: {e}")
        row.wall_s = time.perf_counter() - t
        rss1, disk1 = self.rss(), self.disk()
        row.rss_mb = (rss0 / MiB, max(self.sampler.rss_peak, rss1) / MiB, rss1 / MiB)
        row.disk_mb = (disk0 / MiB, max(self.sampler.disk_peak, disk1) / MiB, disk1 / MiB)
        print(f"    {fmt_row(row)}", flush=True)
        if row.errors.get("timeout") or not self.alive(wait=2):
            self.restart(
                "requests timed out or it stopped answering; its leftover work would bill the next scenario",
                row,
            )


def concurrently(n: int, fn: Callable[[int], Outcome]) -> list[Outcome]:
    """Run ``fn(i)`` for i < n on n threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Outcome:
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def error_message(o: Outcome) -> str:
    try:
        return str(json.loads(o.body)["error"]["message"])[:120]
    except (ValueError, KeyError, TypeError):
        return o.body[:120].decode(errors="replace")


def first_errors(row: Row, outcomes: list[Outcome], k: int = 2) -> None:
    """Add the distinct error messages the server gave (first k) to the row's notes."""
    seen: list[str] = []
    for o in outcomes:
        if not o.ok and o.body:
            msg = f"{o.code}: {error_message(o)}"
            if msg not in seen:
                seen.append(msg)
    for msg in seen[:k]:
        row.notes.append(msg)


# ---------------------------------------------------------------- 1-4, 7: plain requests


def s_lists(b: Bench, n: int) -> None:
    with b.scenario(f"1. {n} concurrent GET /v1/fine_tuning/jobs") as row:
        outs = concurrently(n, lambda _i: b.request("GET", "/v1/fine_tuning/jobs"))
        row.add(outs)
        first_errors(row, outs)


def jsonl_of_size(size: int) -> bytes:
    """Valid supervised JSONL (colour task) of at least ``size`` bytes."""
    line_len = len(to_jsonl(colour_examples(1, seed=0)))
    return to_jsonl(colour_examples(size // line_len + 1, seed=0))


def s_uploads(b: Bench, n: int, kib: int) -> None:
    data = jsonl_of_size(kib * 1024)
    with b.scenario(f"2. {n} concurrent {len(data) / MiB:.1f} MiB uploads") as row:
        stop = threading.Event()
        probes: list[Outcome] = []
        probe_timeout = min(10.0, b.args.timeout)

        def probe(scheduled: float) -> None:
            o = b.request("GET", "/healthz", timeout=probe_timeout)
            o.seconds = time.perf_counter() - scheduled  # a probe queued behind others counts its wait
            probes.append(o)

        def prober() -> None:
            # One probe every 100 ms whether or not the earlier ones have answered: a frozen API
            # shows as many slow probes, not as one probe that blocks the rest.
            with ThreadPoolExecutor(max_workers=128) as pool:
                while not stop.wait(0.1):
                    pool.submit(probe, time.perf_counter())

        probing = threading.Thread(target=prober, daemon=True)
        probing.start()
        outs = concurrently(
            n,
            lambda i: b.request(
                "POST",
                "/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": (f"up{i}.jsonl", data, "application/octet-stream")},
            ),
        )
        stop.set()
        probing.join(timeout=probe_timeout + 5)
        row.add(outs)
        first_errors(row, outs)
        bad = Counter(p.code for p in probes if not p.ok)
        row.notes.append(
            f"/healthz probe every 100 ms during the uploads (bound {probe_timeout:.0f}s): "
            f"{lat_summary([p.seconds for p in probes])}" + (f", failed: {dict(bad)}" if bad else "")
        )
        listed = b.request("GET", "/v1/files?purpose=fine-tune&limit=100", timeout=probe_timeout)
        if listed.ok:
            stored = len(json.loads(listed.body)["data"])
            row.notes.append(f"files listed afterwards: {stored} (uploads answered 200: {row.ok})")
        else:
            row.notes.append(f"files list afterwards: {listed.code}")


def s_chats(b: Bench, specs: list[tuple[int, int]]) -> None:
    warm = b.chat({"messages": PROMPT, "max_tokens": 1}, timeout=b.args.load_timeout)
    print(f"    warm-up chat (loads the model): {warm.code} in {warm.seconds:.1f}s", flush=True)
    for n, max_tokens in specs:
        with b.scenario(f"3. {n} concurrent chats, max_tokens {max_tokens}") as row:
            outs = concurrently(n, lambda _i, mt=max_tokens: b.chat({"messages": PROMPT, "max_tokens": mt}))
            row.add(outs)
            first_errors(row, outs)
            tokens = 0
            for o in outs:
                if o.ok:
                    tokens += json.loads(o.body).get("usage", {}).get("completion_tokens", 0)
            row.notes.append(f"{tokens} completion tokens in {row_wall(outs):.1f}s")


def row_wall(outs: list[Outcome]) -> float:
    return max((o.seconds for o in outs), default=0.0)


def s_abandon(b: Bench) -> None:
    body = {"messages": PROMPT, "n": 16}  # default max_tokens (the server's cap)
    for streamed in (False, True):
        kind = "streamed" if streamed else "non-streamed"
        with b.scenario(f"4. {kind} n=16 chat dropped after 1 s, then a 1-token chat") as row:
            # The first may load the model (after a restart): it gets the model-load bound.
            base = [
                b.chat({"messages": PROMPT, "max_tokens": 1}, timeout=t) for t in (b.args.load_timeout, None)
            ]
            row.notes.append("1-token chat before: " + ", ".join(f"{o.code} {o.seconds:.2f}s" for o in base))
            t = time.perf_counter()
            if streamed:
                got = abandon_stream(b, {"model": MODEL, **body, "stream": True}, after=1.0)
            else:
                got = b.chat(body, timeout=1.0).code
            row.notes.append(f"dropped request: {got} after {time.perf_counter() - t:.1f}s")
            nxt = b.chat({"messages": PROMPT, "max_tokens": 1})
            row.add([nxt])
            first_errors(row, [nxt])


def abandon_stream(b: Bench, body: dict[str, Any], *, after: float) -> str:
    """Open a streamed chat, read it for ``after`` seconds, close the connection."""
    t = time.perf_counter()
    try:
        with b.http.stream(
            "POST",
            b.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {b.key}"},
            timeout=after,
        ) as r:
            chunks = 0
            for _ in r.iter_bytes():
                chunks += 1
                if time.perf_counter() - t > after:
                    break
            return f"{r.status_code}, {chunks} chunks read, then closed"
    except httpx.TimeoutException:
        return "timeout (closed by the client)"
    except httpx.TransportError as e:
        return f"conn ({type(e).__name__})"


def s_nesting(b: Bench, depth: int) -> None:
    with b.scenario(f"7. chat, tools parameters nested {depth} deep") as row:
        nested = '{"x":' * depth + "{}" + "}" * depth
        head = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        body = (
            head[:-1] + ',"tools":[{"type":"function","function":{"name":"f","parameters":' + nested + "}}]}"
        )
        out = b.request(
            "POST",
            "/v1/chat/completions",
            content=body.encode(),
            headers={"Content-Type": "application/json"},
            timeout=b.args.load_timeout,  # it loads the model when scenarios 3 and 4 were skipped
        )
        row.add([out])
        row.notes.append(f"answer: {out.code} {error_message(out)}")


# ---------------------------------------------------------------- 5: oversized bodies


def s_chat_body(b: Bench, mb: int) -> None:
    with b.scenario(f"5a. chat with a {mb} MB JSON body") as row:
        text = ("colour " * (mb * 1_000_000 // 7 + 1))[: mb * 1_000_000]
        out = b.chat({"messages": [{"role": "user", "content": text}], "max_tokens": 1})
        row.add([out])
        row.notes.append(f"answer: {out.code} after {out.seconds:.1f}s {error_message(out)}")


def raw_chunked_upload(
    b: Bench, *, purpose: str, filename: str, block: bytes, cap: int, timeout: float
) -> dict[str, Any]:
    """POST /v1/files as chunked multipart over a plain socket, generating ``cap`` bytes of ``block``s.

    Stops sending as soon as the socket turns readable (the server answered or closed), when
    the server stops reading for 10 s, or after ``timeout``; then waits for the status line.
    """
    assert b.server is not None
    port = int(b.url.rsplit(":", 1)[1])
    boundary = "openftbench" + secrets.token_hex(8)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {b.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    pre = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    post = f"\r\n--{boundary}--\r\n".encode()

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n" % len(data) + data + b"\r\n"

    sent, stopped = 0, "sent everything"
    t = time.perf_counter()
    answered_at: float | None = None
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            sock.sendall(head + chunk(pre))
            while True:
                if select.select([sock], [], [], 0)[0]:
                    answered_at = time.perf_counter() - t
                    stopped = "server answered or closed while we were sending"
                    break
                if sent >= cap:
                    sock.sendall(chunk(post) + b"0\r\n\r\n")
                    break
                if time.perf_counter() - t > timeout:
                    stopped = f"client gave up sending after {timeout:.0f}s"
                    break
                part = block[: cap - sent]
                sock.sendall(chunk(part))
                sent += len(part)
        except TimeoutError:
            stopped = "server stopped reading (send blocked 10 s)"
        except OSError as e:
            answered_at = time.perf_counter() - t
            stopped = f"connection closed by the server while sending ({type(e).__name__})"
        status = "no answer"
        try:
            sock.settimeout(max(1.0, timeout - (time.perf_counter() - t)))
            data = b""
            while b"\r\n\r\n" not in data:
                got = sock.recv(65536)
                if not got:
                    break
                data += got
            if data:
                status = data.split(b"\r\n", 1)[0].decode(errors="replace").split(" ", 1)[-1]
                answered_at = answered_at or time.perf_counter() - t
                body = data.split(b"\r\n\r\n", 1)[-1]
                while len(body) < 4096:  # the small JSON error, for the notes
                    sock.settimeout(2)
                    more = sock.recv(65536)
                    if not more:
                        break
                    body += more
                if not status.startswith("2"):
                    status += " " + error_message(Outcome("", 0, body.split(b"\r\n", 1)[-1]))
            else:
                status = "closed without an answer"
        except TimeoutError:
            status = "timeout"
        except OSError as e:
            status = f"conn ({type(e).__name__})"
    finally:
        sock.close()
    return {
        "status": status,
        "answer_s": answered_at,
        "sent_mib": sent / MiB,
        "stopped": stopped,
        "wall_s": time.perf_counter() - t,
    }


def s_chunked(b: Bench, name: str, *, purpose: str, filename: str, line: bytes, mib: int) -> None:
    with b.scenario(name) as row:
        block = line * (MiB // len(line) + 1)
        r = raw_chunked_upload(
            b, purpose=purpose, filename=filename, block=block[:MiB], cap=mib * MiB, timeout=b.args.timeout
        )
        code = r["status"].split(" ", 1)[0]
        row.add(
            [Outcome(code if code.isdigit() else r["status"].split(" ")[0], r["answer_s"] or r["wall_s"])]
        )
        row.notes.append(
            f"answer: {r['status']}; time to answer "
            + (f"{r['answer_s']:.2f}s" if r["answer_s"] is not None else "none")
            + f"; sent {r['sent_mib']:.0f} MiB ({r['stopped']})"
        )


# ---------------------------------------------------------------- 6: SIGKILL mid-training


def s_kill(b: Bench, examples: int, epochs: int, train_timeout: float) -> None:
    with b.scenario(f"6. SIGKILL mid-training ({examples} ex x {epochs} ep), restart") as row:
        up = b.request(
            "POST",
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", to_jsonl(colour_examples(examples, seed=1)))},
        )
        if not up.ok:
            row.add([up])
            row.notes.append(f"upload failed: {up.code} {error_message(up)}")
            return
        job = b.request(
            "POST",
            "/v1/fine_tuning/jobs",
            json={
                "training_file": json.loads(up.body)["id"],
                "model": MODEL,
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": 8}},
                },
            },
        )
        if not job.ok:
            row.add([job])
            row.notes.append(f"job create failed: {job.code} {error_message(job)}")
            return
        job_id = json.loads(job.body)["id"]
        t0 = time.perf_counter()
        trigger = None
        while time.perf_counter() - t0 < train_timeout and trigger is None:
            for e in events(b, job_id):
                if e["type"] == "metrics" or e["message"].startswith("Checkpoint created"):
                    trigger = e
                    break
            else:
                time.sleep(0.1)
        if trigger is None:
            row.notes.append(f"no metrics/checkpoint event within {train_timeout:.0f}s; not killed")
            return
        seen_step = trigger.get("data", {}).get("step")
        b.kill()
        row.notes.append(
            f"SIGKILL at '{trigger['message'][:40]}' (step {seen_step}), {time.perf_counter() - t0:.1f}s after create"
        )
        t1 = time.perf_counter()
        b.start()
        b.restarts += 1
        status = "?"
        while time.perf_counter() - t1 < train_timeout:
            r = b.request("GET", f"/v1/fine_tuning/jobs/{job_id}")
            if r.ok:
                status = json.loads(r.body)["status"]
                if status in ("succeeded", "failed", "cancelled"):
                    break
            time.sleep(0.5)
        took = time.perf_counter() - t1
        row.add([Outcome("200" if status == "succeeded" else status, took)])
        row.notes.append(f"after restart: job {status} in {took:.0f}s (lease {b.args.lease_seconds:g}s)")
        evs = list(reversed(events(b, job_id, every=True)))  # oldest first
        steps = [e["data"]["step"] for e in evs if e["type"] == "metrics" and "step" in e.get("data", {})]
        per_step = Counter(steps)
        total = max((e["data"].get("total_steps", 0) for e in evs if e["type"] == "metrics"), default=0)
        rerun = sorted(s for s, c in per_step.items() if c > 1)
        row.notes.append(
            f"{len(steps)} metrics events for {len(per_step)} distinct steps (job has {total}); "
            f"steps reported twice or more: {len(rerun)}" + (f" ({rerun[0]}..{rerun[-1]})" if rerun else "")
        )
        msgs = Counter(e["message"] for e in evs if e["type"] != "metrics")
        dup = {m: c for m, c in msgs.items() if c > 1}
        if dup:
            row.notes.append(
                f"{sum(c - 1 for c in dup.values())} repeated non-metrics events, e.g. "
                + "; ".join(f"{m[:40]!r} x{c}" for m, c in list(dup.items())[:3])
            )
        resumed = [e["message"] for e in evs if "resum" in e["message"].lower()]
        if resumed:
            row.notes.append(f"resume event: {resumed[0][:80]!r}")


def events(b: Bench, job_id: str, every: bool = False) -> list[dict[str, Any]]:
    """A job's events, newest first; ``every`` pages through all of them."""
    out: list[dict[str, Any]] = []
    after = None
    while True:
        q = "?limit=100" + (f"&after={after}" if after else "")
        r = b.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events{q}", timeout=30)
        if not r.ok:
            return out
        page = json.loads(r.body)
        out.extend(page["data"])
        if not (every and page.get("has_more") and page["data"]):
            return out
        after = page["data"][-1]["id"]


# ---------------------------------------------------------------- output


def fmt_row(r: Row) -> str:
    errs = ", ".join(f"{k}:{v}" for k, v in sorted(r.errors.items())) or "-"
    p50, p99 = pct(r.latencies, 0.5), pct(r.latencies, 0.99)
    rss = "/".join(f"{x:.0f}" for x in r.rss_mb) if r.rss_mb else "?"
    disk = "/".join(f"{x:.0f}" for x in r.disk_mb) if r.disk_mb else "?"
    return (
        f"{r.scenario[:52]:<52} {r.sent:>5} {r.ok:>5} {r.n5xx:>4}  {errs[:26]:<26} "
        f"{p50 if p50 is not None else float('nan'):>7.2f} {p99 if p99 is not None else float('nan'):>7.2f}"
        f"  {rss:>15}  {disk:>15}"
    )


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'scenario':<52} {'sent':>5} {'ok':>5} {'5xx':>4}  {'errors (code:count)':<26} "
        f"{'p50 s':>7} {'p99 s':>7}  {'RSS MB b/pk/a':>15}  {'disk MB b/pk/a':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(fmt_row(r))
    print("\nnotes:")
    for r in rows:
        for n in r.notes:
            print(f"  {r.scenario.split(' ', 1)[0]} {n}")


def parse_chats(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, spec.split(",")):
        n, _, mt = part.partition("x")
        out.append((int(n), int(mt)))
    return out


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lists", type=int, default=200, help="concurrent job lists (0 skips)")
    ap.add_argument("--uploads", type=int, default=50, help="concurrent uploads (0 skips)")
    ap.add_argument("--upload-kib", type=int, default=1024, help="size of each upload")
    ap.add_argument("--chats", default="8x64,32x64,32x1024", help="CONCURRENCYxMAX_TOKENS,... ('' skips)")
    ap.add_argument("--no-abandon", dest="abandon", action="store_false", help="skip scenario 4")
    ap.add_argument("--chat-body-mb", type=int, default=20, help="oversized chat body, MB (0 skips)")
    ap.add_argument("--chunked-mb", type=int, default=2048, help="chunked upload cap, MiB (0 skips)")
    ap.add_argument(
        "--no-newline-mb", type=int, default=1024, help="fine-tune upload with no newline, MiB (0 skips)"
    )
    ap.add_argument("--no-kill", dest="kill", action="store_false", help="skip scenario 6")
    ap.add_argument("--train-examples", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--nesting", type=int, default=600, help="JSON nesting depth (0 skips)")
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on each request and each wait, s")
    ap.add_argument(
        "--load-timeout", type=float, default=120.0, help="bound on a chat that loads the model (cold), s"
    )
    ap.add_argument("--train-timeout", type=float, default=180.0, help="bound on each wait for training, s")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--lease-seconds",
        type=float,
        default=10.0,
        help="server's OPENFT_LEASE_SECONDS (reclaim after SIGKILL)",
    )
    ap.add_argument("--quick", action="store_true", help="small smoke run: every scenario, tiny sizes")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.lists, args.uploads, args.upload_kib, args.chats = 10, 4, 64, "2x8"
        args.chat_body_mb, args.chunked_mb, args.no_newline_mb = 1, 8, 4
        args.train_examples, args.epochs, args.nesting = 48, 1, 100

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` of the bench still stops the server
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    print(
        f"machine: {os.cpu_count()} cores, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="openft-load-") as tmp:
        b = Bench(Path(tmp), args)
        stop_note = ""
        try:
            print(f"server up in {b.start():.1f}s", flush=True)
            if args.lists:
                s_lists(b, args.lists)
            if args.uploads:
                s_uploads(b, args.uploads, args.upload_kib)
            if args.chats:
                s_chats(b, parse_chats(args.chats))
            if args.abandon:
                s_abandon(b)
            if args.nesting:
                s_nesting(b, args.nesting)
            if args.chat_body_mb:
                s_chat_body(b, args.chat_body_mb)
            uploads = (  # (MiB, row name, purpose, filename, the block repeated to make the body)
                (
                    args.chunked_mb,
                    "5b. chunked upload, {} MiB, no Content-Length",
                    "user_data",
                    "big.bin",
                    b"0123456789abcdef",
                ),
                (
                    args.no_newline_mb,
                    "5c. fine-tune upload, {} MiB, no newline",
                    "fine-tune",
                    "one-line.jsonl",
                    b"x",
                ),
            )
            for mib, name, purpose, filename, unit in uploads:
                if mib:
                    s_chunked(
                        b, name.format(mib), purpose=purpose, filename=filename, line=unit * 1024, mib=mib
                    )
            if args.kill:
                s_kill(b, args.train_examples, args.epochs, args.train_timeout)
        except KeyboardInterrupt:
            print("interrupted; stopping the server", flush=True)
        finally:
            if b.sampler is not None:
                b.sampler.close()
            stop_note = b.stop()
            log_tail = b.server.log.read_text(errors="replace")[-2000:] if b.server else ""
            b.http.close()
    load1 = os.getloadavg()
    wall = time.perf_counter() - t_all
    print(
        f"\nopenft load run, {MODEL}, serve --workers {args.workers}, request bound {args.timeout:.0f}s, {wall:.0f}s in all"
    )
    print_table(b.rows)
    print(f"\nserver restarts by the bench: {b.restarts}; shutdown at the end: {stop_note}")
    print(
        f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
        f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (1/5/15 min, {os.cpu_count()} cores)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "cores": os.cpu_count(),
                    "loadavg_before": load0,
                    "loadavg_after": load1,
                    "wall_s": wall,
                    "restarts": b.restarts,
                    "shutdown": stop_note,
                    "rows": [r.to_json() for r in b.rows],
                    "server_log_tail": log_tail,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
