"""`python -m stack` (what `make run` runs) as a test fixture: on loopback ports, a fresh demo directory."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.child_env import child_env
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "stack-test-token"


@dataclass
class RunningStack:
    proc: subprocess.Popen
    address: str
    demo: Path
    http: str  # the OpenAI-compatible HTTP API, http://127.0.0.1:<port>
    lines: queue.Queue  # stdout after the first line (the banner)


@contextlib.contextmanager
def running_stack(demo: Path, *extra: str) -> Iterator[RunningStack]:
    env = child_env(LORASERVE_ADMIN_TOKEN=TOKEN)
    http_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stack", "--demo-dir", str(demo), "--port", "0", "--store-port", "0",
                             "--worker-port", "0", "--http-port", str(http_port), "--log-level", "warning",
                             "--device", "cpu", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        try:
            first = lines.get(timeout=240)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"the stack did not start in 240 s:\n{proc.stderr.read()[-3000:]}")
        assert first.startswith("loraserve stack serving on "), first
        yield RunningStack(proc, first.strip().rsplit(" ", 1)[1], demo, f"http://127.0.0.1:{http_port}", lines)
    finally:
        # SIGTERM: the supervisor stops router, worker and store (each in its own session, so a SIGKILL
        # of the supervisor alone would leave them running after the tests); SIGKILL if it hangs.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
