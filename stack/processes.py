"""The services as child processes: started in their own session (Ctrl-C reaches only the launcher, which
stops them in order), stderr to a log file, ready when they print their `... serving on host:port` line."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT_S = 30.0


class ServiceFailed(Exception):
    """A service exited or did not report ready; the message ends with the tail of its log."""


@dataclass
class Service:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""
    _proc: subprocess.Popen | None = None
    _lines: queue.Queue = field(default_factory=queue.Queue)

    def start(self, cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it; closed with the process)
        self._proc = subprocess.Popen([sys.executable, "-m", *self.args], cwd=cwd, env={**os.environ, **self.env},
                                      stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        log.close()
        threading.Thread(target=self._pump, daemon=True, name=f"{self.name}-stdout").start()

    def _pump(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout_s: float) -> str:
        """Block until the ready line; return the address it names."""
        try:
            while True:
                line = self._lines.get(timeout=timeout_s)
                if line is None:
                    raise ServiceFailed(f"{self.name} exited with status {self._proc.wait()}{self._log_tail()}")
                if " serving on " in line:
                    self.address = line.strip().rsplit(" ", 1)[1]
                    return self.address
        except queue.Empty:
            raise ServiceFailed(f"{self.name} did not start within {timeout_s:.0f}s{self._log_tail()}") from None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, no drain (a crash, for failover tests and benchmarks)."""
        if self.running():
            self._proc.kill()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the services drain), then SIGKILL after `timeout_s`; the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                return self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self._proc.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; the end of {self.log_path}:\n" + "\n".join(tail) if tail else ""
