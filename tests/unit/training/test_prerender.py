"""The render pre-pass on several processes: the serial results, in order, with the same errors;
large results through /dev/shm (none left behind), not the pool's pipe; this process renders its
share; pixels stored in the run's autocast dtype change nothing the model computes."""

from __future__ import annotations

import functools
import io
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import threading
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from PIL import Image

from openft.datasets.formats import ChatExample, ImagePart, Message, TextPart
from openft.errors import InvalidRequest, JobFailed
from openft.models.loader import load_model, resolve_base
from openft.models.render import Rendered
from openft.training import prerender
from openft.training.collate import collate_sft
from openft.training.prerender import MIN_EXAMPLES_PER_WORKER, render_all, render_workers
from openft.training.recipes.sft import _render
from tests.unit.models.tiny_llava import build_tiny_llava

E = TypeVar("E", bound=BaseException)


def _png(rng: random.Random, size: int) -> bytes:
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    img.putpixel((rng.randrange(size), rng.randrange(size)), (rng.randrange(256), 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _examples(n: int, seed: int = 0) -> list[ChatExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts: tuple = (TextPart(f"what is shown in picture {i}?"),)
        if i % 3:  # text-only examples in between
            parts = (ImagePart(url="data:", data=_png(rng, rng.choice([56, 84, 112]))), *parts)
        out.append(
            ChatExample(
                line=i + 1,
                messages=(Message("user", parts), Message("assistant", (TextPart(f"answer {i}"),), weight=1)),
            )
        )
    return out


def _same(a: list[Rendered], b: list[Rendered]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.input_ids, x.labels, x.n_image_tokens, x.image_spans) == (
            y.input_ids,
            y.labels,
            y.n_image_tokens,
            y.image_spans,
        )
        assert sorted(x.vision) == sorted(y.vision)
        for key in x.vision:
            assert x.vision[key].dtype == y.vision[key].dtype and torch.equal(x.vision[key], y.vision[key])


def test_a_pool_renders_what_the_serial_loop_renders_in_order(processor) -> None:
    examples = _examples(13)
    fn = functools.partial(_render, processor, max_length=512)
    serial = [fn(ex) for ex in examples]
    assert any(r.vision for r in serial) and any(not r.vision for r in serial)
    _same(render_all(fn, examples, workers=1), serial)
    _same(render_all(fn, examples, workers=3), serial)


def test_a_failing_example_gives_the_serial_error_for_the_first_one_in_file_order(processor) -> None:
    examples = _examples(12)
    long = Message("user", (TextPart("filler " * 400),))
    for i in (6, 10):  # lines 7 and 11: nothing left to train on after truncation to 64 tokens
        examples[i] = ChatExample(line=i + 1, messages=(long, examples[i].messages[1]))
    fn = functools.partial(_render, processor, max_length=64, what="validation file ")
    errors = []
    for workers in (1, 2):
        with pytest.raises(InvalidRequest) as caught:
            render_all(fn, examples, workers=workers)
        errors.append((caught.value.message, caught.value.param, caught.value.code))
    assert errors[0] == errors[1]
    assert errors[0][0].startswith("validation file line 7: example is ")


def test_auto_process_count_is_this_process_share_of_the_cores(monkeypatch) -> None:
    threads = 8
    monkeypatch.setattr("openft.training.prerender.torch.get_num_threads", lambda: threads)
    monkeypatch.setattr("openft.training.prerender.available_cores", lambda: 8)
    assert render_workers(None, 10) == 1  # too few examples to pay for a fork
    assert render_workers(None, 3 * MIN_EXAMPLES_PER_WORKER) == 3
    assert render_workers(None, 100_000) == 8  # this process renders too: one per core
    assert render_workers(1, 100_000) == 1 and render_workers(4, 10) == 4
    threads = 1  # `openft serve` with one embedded worker on 2 cores: the API has the other one
    assert render_workers(None, 100_000) == 1
    threads = 2  # a dedicated worker on 2 cores: one forked worker beside it (bench/README.md)
    monkeypatch.setattr("openft.training.prerender.available_cores", lambda: 2)
    assert render_workers(None, 100_000) == 2
    threads = 16  # more threads asked than cores: still one process per core
    assert render_workers(None, 100_000) == 2


def test_pixels_are_stored_in_the_asked_dtype_at_half_the_bytes(processor) -> None:
    examples = _examples(6)
    fn = functools.partial(_render, processor, max_length=512)
    full = render_all(fn, examples, workers=1)
    half = render_all(fn, examples, workers=2, pixel_dtype=torch.bfloat16)
    for f, h in zip(full, half, strict=True):
        if not f.vision:
            continue
        assert f.vision["pixel_values"].dtype == torch.float32
        assert h.vision["pixel_values"].dtype == torch.bfloat16
        assert h.vision["pixel_values"].nbytes * 2 == f.vision["pixel_values"].nbytes
        assert torch.equal(h.vision["image_grid_thw"], f.vision["image_grid_thw"])  # integers untouched
        assert torch.equal(h.vision["pixel_values"], f.vision["pixel_values"].to(torch.bfloat16))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    base = resolve_base("openft-tiny-vlm", tmp_path_factory.mktemp("tiny-cache"))
    return load_model(base, device="cpu")


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")), device="cpu")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_bf16_pixels_give_the_same_logits_under_bf16_autocast(family, tiny, llava) -> None:
    """Why storing bf16 pixels is lossless for a bf16 run: the vision tower's first use of them is
    its patch convolution, which autocast runs in bf16 on pixels it rounds to bf16 anyway."""
    model, processor = tiny if family == "qwen2_vl" else llava
    examples = [ex for ex in _examples(6) if len(ex.messages[0].content) == 2]
    fn = functools.partial(_render, processor, max_length=512)
    pad = processor.tokenizer.pad_token_id or 0
    full = collate_sft(render_all(fn, examples, workers=1), pad)
    half = collate_sft(render_all(fn, examples, workers=1, pixel_dtype=torch.bfloat16), pad)
    assert half["pixel_values"].dtype == torch.bfloat16
    logits = []
    for batch in (full, half):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits.append(model(**inputs, use_cache=False).logits)
    assert logits[0].dtype == torch.bfloat16
    assert torch.equal(logits[0], logits[1])
    # ...whereas without autocast (an fp32 run) the rounding would show: hence fp32 is kept there.
    with torch.no_grad():
        a = model(**{k: v for k, v in full.items() if k != "labels"}, use_cache=False).logits
        b = model(
            **{k: (v.float() if k == "pixel_values" else v) for k, v in half.items() if k != "labels"},
            use_cache=False,
        ).logits
    assert not torch.equal(a, b)


def _fail_at_41(i: int) -> torch.Tensor:
    if i == 40:
        raise InvalidRequest("line 41: no assistant message", param="training_file", code="bad_line")
    return torch.zeros(4 << 20)  # 16 MiB: the workers are busy writing results when line 41 fails


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "pipe"])
def test_a_failure_with_large_results_in_flight_raises_and_leaves_no_worker(
    shared_memory, monkeypatch, tmp_path
) -> None:
    # Terminating the pool on the error had hung a CI run (and hangs this test's shape on the
    # first try with results through the pipe, as without room in /dev/shm): a worker blocked
    # writing a large result holds the result pipe's lock, which Pool.terminate waits for after
    # it has stopped reading results.
    if not shared_memory:
        monkeypatch.setattr(prerender, "SHM_DIR", tmp_path / "missing")
    error = _raised_without_hanging(_fail_at_41, list(range(200)), InvalidRequest)
    assert error.message == "line 41: no assistant message"
    assert multiprocessing.active_children() == []
    assert _segments() == []  # the results discarded after the failure had their files unlinked too
    assert render_all(_fail_at_41, [1, 2, 3], workers=2)[2].shape == (4 << 20,)  # a new pool works
    assert _segments() == []


def _segments() -> list[str]:
    """This process's pre-pass files in /dev/shm (other processes' runs are not ours to judge)."""
    return sorted(p.name for p in prerender.SHM_DIR.glob(f"{prerender.SEGMENT_PREFIX}{os.getpid()}-*"))


_PARENT = 0
"""The test process's pid, set before a pool forks."""
_WORKER_RENDERED = multiprocessing.get_context("fork").Event()


def _pixels_of(i: int) -> tuple[int, dict[str, torch.Tensor]]:
    """Result ``i`` of a few MiB (fp32, bf16 and a small integer tensor), and the pid rendering it.
    This process waits for a worker's first render, so both shares are non-empty however the
    machine schedules the processes."""
    if os.getpid() == _PARENT:
        _WORKER_RENDERED.wait(timeout=600)
    else:
        _WORKER_RENDERED.set()
    pixels = torch.linspace(-1, 1, 1 << 20) * (i + 1)
    return os.getpid(), {"pixels": pixels, "half": pixels.to(torch.bfloat16), "grid": torch.tensor([1, i, 8])}


@pytest.fixture
def pipe_bytes(monkeypatch) -> list[int]:
    """Bytes this process receives through multiprocessing pipes (the pool's results among them)."""
    received: list[int] = []
    real = multiprocessing.connection.Connection._recv_bytes

    def counting(self, *args, **kwargs):
        buf = real(self, *args, **kwargs)
        received.append(buf.getbuffer().nbytes)
        return buf

    monkeypatch.setattr(multiprocessing.connection.Connection, "_recv_bytes", counting)
    return received


def _as_the_parent() -> None:
    """Before a pool forks: this is the process that waits for a worker's first render."""
    global _PARENT
    _PARENT = os.getpid()
    _WORKER_RENDERED.clear()


def _render_big(n: int) -> list[tuple[int, dict[str, torch.Tensor]]]:
    _as_the_parent()
    return render_all(_pixels_of, list(range(n)), workers=2)


def test_this_process_renders_a_share_beside_its_workers() -> None:
    pids = [pid for pid, _ in _render_big(16)]
    assert os.getpid() in pids and set(pids) - {os.getpid()}
    assert multiprocessing.active_children() == []


def test_large_results_come_back_identical_through_shared_memory_not_the_pipe(pipe_bytes) -> None:
    out = _render_big(32)  # 192 MiB of results
    assert {pid for pid, _ in out} - {os.getpid()}  # (a worker rendered some)
    for i, (_, got) in enumerate(out):
        _, want = _pixels_of(i)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key])
    assert 0 < sum(pipe_bytes) < 1 << 20  # only the pickles' small parts crossed the pipe
    assert _segments() == []


def test_without_room_in_shared_memory_results_come_through_the_pipe(
    pipe_bytes, monkeypatch, tmp_path
) -> None:
    monkeypatch.setattr(prerender, "SHM_DIR", tmp_path / "missing")  # the workers cannot write there
    out = _render_big(8)
    for i, (_, got) in enumerate(out):
        _, want = _pixels_of(i)
        assert all(torch.equal(got[key], want[key]) for key in want)
    assert sum(pipe_bytes) > 6 << 20  # each worker-rendered result (6 MiB) crossed the pipe


def _raise_at_5(i: int) -> torch.Tensor:
    if i == 5:
        raise RuntimeError("the image processor broke on item 5")
    return torch.ones(1 << 20)


def test_an_unexpected_error_is_raised_as_the_serial_loop_raises_it_and_leaves_nothing() -> None:
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="broke on item 5"):
            render_all(_raise_at_5, list(range(40)), workers=workers)
    assert multiprocessing.active_children() == []
    assert _segments() == []


def _unsendable_from_a_worker(i: int) -> object:
    if os.getpid() == _PARENT:
        _WORKER_RENDERED.wait(timeout=600)  # (so a worker surely renders one)
        return i
    _WORKER_RENDERED.set()
    return threading.Lock()  # a result a worker cannot pickle back


def test_a_result_a_worker_cannot_send_raises_and_leaves_nothing() -> None:
    # The pool re-raises the worker's pickling error in this process, which then stops the other
    # workers, drains their replies (unlinking their files) and joins them.
    _as_the_parent()
    error = _raised_without_hanging(_unsendable_from_a_worker, list(range(40)), TypeError)
    assert "pickle" in str(error)
    assert multiprocessing.active_children() == []
    assert _segments() == []


def _raised_without_hanging(fn, items: list[int], kind: type[E]) -> E:
    """The ``kind`` error ``render_all`` on 2 processes raises. The thread only turns a hang into
    a failure; a pass takes seconds."""
    outcome: list[E] = []

    def run() -> None:
        try:
            render_all(fn, items, workers=2)
        except kind as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=600)
    assert not thread.is_alive(), "render_all hung after an error"
    assert len(outcome) == 1
    return outcome[0]


def test_files_a_killed_pre_pass_left_are_swept_by_the_next_one(tmp_path, monkeypatch) -> None:
    """A pre-pass SIGKILLed mid-render leaves its chunk files in tmpfs (memory). The next pre-pass
    removes those whose parent process is gone once they are old enough, and nothing else: not a
    live parent's, not a fresh one (a parent in another pid namespace), not another program's."""
    import signal
    import subprocess
    import sys
    import time

    monkeypatch.setattr(prerender, "SHM_DIR", tmp_path)
    # A real pre-pass parent killed mid-render: its chunk file stays behind.
    script = (
        "import sys, time, torch\n"
        "from openft.training import prerender\n"
        f"prerender.SHM_DIR = __import__('pathlib').Path({str(tmp_path)!r})\n"
        "def slow(i):\n"
        "    time.sleep(0.2 if i < 8 else 60)\n"
        "    return torch.zeros(1 << 16)\n"
        "print('go', flush=True)\n"
        "prerender._forked(slow, list(range(64)), 2)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdout.readline().strip() == b"go"
    while not list(tmp_path.glob(f"{prerender.SEGMENT_PREFIX}{child.pid}-*")):
        assert child.poll() is None
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    left = list(tmp_path.glob(f"{prerender.SEGMENT_PREFIX}{child.pid}-*"))
    assert left
    live = tmp_path / f"{prerender.SEGMENT_PREFIX}{os.getpid()}-1-0"
    other = tmp_path / "someone-else"
    for path in (live, other):
        path.write_bytes(b"x")
    old = time.time() + 2 * prerender.STALE_AFTER_S  # as if this much later

    assert prerender.sweep_stale_segments() == 0  # too fresh: could be another namespace's
    assert prerender.sweep_stale_segments(now=old) == len(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


_KILLS = multiprocessing.get_context("fork").Value("i", 0)
"""Render workers killed so far by ``_kill_this_worker`` (shared with the forked workers)."""


def _to_be_killed(times: int) -> bool:
    """Whether this process is a render worker (never this test process) to be killed: fewer than
    ``times`` were so far (counted as killed from now)."""
    if os.getpid() == _PARENT:
        return False
    with _KILLS.get_lock():
        if _KILLS.value >= times:
            return False
        _KILLS.value += 1
    return True


def _kill_this_worker(times: int) -> None:
    """SIGKILL this process, as the kernel's out-of-memory killer would, if it is to be killed."""
    if _to_be_killed(times):
        os.kill(os.getpid(), signal.SIGKILL)


def _killing_at_3(i: int, *, times: int) -> torch.Tensor:
    """Item ``i`` (1 MiB: through /dev/shm); the first ``times`` workers rendering item 3 die."""
    if i == 3:
        _kill_this_worker(times)
    return torch.full((1 << 18,), float(i))


def _pre_pass_with_kills(times: int) -> list[torch.Tensor]:
    _as_the_parent()
    _KILLS.value = 0
    return render_all(functools.partial(_killing_at_3, times=times), list(range(40)), workers=2)


@pytest.mark.parametrize("where", ["rendering", "after writing its file", "halfway through sending"])
def test_a_worker_killed_mid_render_has_its_chunk_rendered_again_and_nothing_is_left(
    where, monkeypatch, tmp_path
) -> None:
    # multiprocessing.Pool replaced the dead worker but lost its task: this pre-pass waited forever.
    times = 1
    if where == "after writing its file":  # before sending its name: the file is ours to remove
        times = 0
        real_write = prerender._write_segment

        def write_then_die(buffers: list[memoryview]) -> str | None:
            name = real_write(buffers)
            _kill_this_worker(1)
            return name

        monkeypatch.setattr(prerender, "_write_segment", write_then_die)
    elif where == "halfway through sending":  # a large result through the pipe, cut short
        times = 0
        monkeypatch.setattr(prerender, "SHM_DIR", tmp_path / "missing")
        real_send = multiprocessing.connection.Connection._send

        def send_half_then_die(self, buf, *args):
            if len(buf) > 1 << 20 and _to_be_killed(1):
                real_send(self, buf[: len(buf) // 2], *args)
                os.kill(os.getpid(), signal.SIGKILL)
            real_send(self, buf, *args)

        monkeypatch.setattr(multiprocessing.connection.Connection, "_send", send_half_then_die)
    out = _pre_pass_with_kills(times)
    assert _KILLS.value == 1  # a worker did die there
    assert len(out) == 40
    for i, got in enumerate(out):  # the serial results, in order
        assert torch.equal(got, torch.full((1 << 18,), float(i)))
    assert multiprocessing.active_children() == []
    assert _segments() == []


def test_a_chunk_that_kills_every_worker_fails_the_pre_pass_with_a_clear_error() -> None:
    with pytest.raises(JobFailed) as caught:
        _pre_pass_with_kills(times=1000)
    assert _KILLS.value == prerender.MAX_KILLS  # rendered again on a new worker once, then given up
    error = caught.value
    assert error.code == "render_worker_killed"
    assert "killed by signal 9 (SIGKILL), most likely by the kernel's out-of-memory killer" in error.message
    assert "rendering examples 4-6 of the file, 2 times" in error.message
    assert "OPENFT_TORCH_THREADS" in error.message and "more memory" in error.message
    assert multiprocessing.active_children() == []
    assert _segments() == []
    assert len(_pre_pass_with_kills(times=0)) == 40  # the next pre-pass works


def test_workers_of_a_killed_pre_pass_exit_and_remove_their_files(tmp_path) -> None:
    """The training process SIGKILLed mid pre-pass (its workers not): each worker sees its pipes
    closed, removes the file it could not send, and exits, rather than waiting forever for work."""
    import subprocess
    import sys
    import time

    script = (
        "import multiprocessing, os, sys, time, torch\n"
        "from openft.training import prerender\n"
        "parent = os.getpid()\n"
        "def slow(i):\n"
        "    if os.getpid() == parent:\n"
        "        print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "        time.sleep(600)\n"
        "    time.sleep(0.05)\n"
        "    return torch.zeros(1 << 18)\n"
        "prerender._forked(slow, list(range(400)), 3)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    workers = [int(pid) for pid in child.stdout.readline().split()]
    assert len(workers) == 2
    child.kill()
    child.wait()
    for pid in workers:  # reparented: gone, or a zombie nobody reaps here
        while (
            Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        ):
            time.sleep(0.05)
    for pid in workers:  # (named after the pre-pass's process, not init that adopted them)
        assert not list(prerender.SHM_DIR.glob(f"{prerender.SEGMENT_PREFIX}*-{pid}-*"))
