"""Services as child processes for the router's cluster tests: spawn with stderr to a log, wait for the
ready line, stop (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    address: str = ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(name: str, cmd: list[str], log_dir: Path, env: dict | None = None) -> tuple[Proc, queue.Queue]:
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    popen = subprocess.Popen(cmd, cwd=ROOT, env=child_env(**(env or {})),
                             stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in popen.stdout], daemon=True).start()
    return Proc(name, popen), lines


def ready(proc: Proc, lines: queue.Queue, log_dir: Path, timeout: float = 90) -> Proc:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.stop(signal.SIGKILL)
        pytest.fail(f"{proc.name} printed no ready line in {timeout}s:\n{(log_dir / f'{proc.name}.log').read_text()}")
    assert " serving on " in line, line
    proc.address = line.strip().rsplit(" ", 1)[1]
    return proc


def worker_cmd(worker_id: str, model_dir: Path, store: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpu_worker", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
            "--worker-id", worker_id, "--adapter-store", store, "--adapter-cache-dir", str(cache), "--max-loras", "2",
            "--max-cpu-loras", "8", "--num-kv-blocks", "128", "--drain-timeout-s", "0", "--status-interval-ms", "10",
            "--log-level", "warning", *extra]


