"""Each example of examples/ runs and shows what it says it shows (the offline ones here, on the tiny test
model; examples/serving.py in tests/test_stack.py against `make run`'s stack; the S3 resolver plugin in
tests/store/test_example_s3_plugin.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, model: Path, adapters: Path) -> str:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--model", str(model), "--adapters",
                          str(adapters), "--device", "cpu"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def adapters(tiny_adapters) -> Path:
    return next(iter(tiny_adapters.values())).parent


def test_offline_inference(tiny_model_dir, adapters):
    out = run_example("offline_inference", tiny_model_dir, adapters)
    assert [line.split("]")[0] for line in out.splitlines()] == ["[sql-lora", "[base", "[chat-lora"]
    assert all(line.endswith(("(length)", "(stop)")) for line in out.splitlines())


def test_engine_step_api(tiny_model_dir, adapters):
    out = run_example("engine_step_api", tiny_model_dir, adapters)
    finished = re.findall(r"^(req-\d+) \[([\w-]+)\]", out, re.M)
    assert sorted(r for r, _ in finished) == sorted(f"req-{i}" for i in range(10))
    assert {a for _, a in finished} == {"base", "sql-lora", "chat-lora", "code-lora", "math-lora"}
    assert "10 requests, 4 adapters and the base model" in out


def test_lora_limits(tiny_model_dir, adapters):
    out = run_example("lora_limits", tiny_model_dir, adapters)
    assert "max_loras=1: finished [('sql-lora', 'length'), ('chat-lora', 'length'), ('math-lora', 'length'), " \
           "('sql-lora', 'length')]" in out
    assert "max_lora_rank=8: refused (rank)" in out and "over max_lora_rank=8" in out
