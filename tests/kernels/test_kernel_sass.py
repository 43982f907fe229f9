"""benchmarks.kernel_sass: the elementwise kernels compiled for sm_90 on this CPU machine (Triton's own ptxas and
nvdisasm; in a child process, since the tests interpret Triton), their SASS parsed. What it shows about the GPU
build is checked here: bf16 rounded by the hardware convert (kernels._common.round_low's inline PTX), not on the
bits; the expanding variants' extra loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_sass", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_hopper_and_its_code_is_counted(report):
    assert {name.split()[0] for name in report} == {"add_rms_norm", "rope_and_cache", "silu_mul", "lora_expand",
                                                    "lora_expand_rows"}
    for op in ("add_rms_norm", "rope_and_cache", "silu_mul"):
        base, expand = report[f"{op} base"], report[f"{op} expand"]
        assert 100 < base["instructions"] < expand["instructions"]
        # The expand also reads the row's slot and y, and B: more loads than the op alone.
        assert expand["global loads"] >= base["global loads"] + 4
        assert sum(n for _, n in base["top"]) <= base["instructions"]
        assert sum(expand["load bits"].values()) == expand["global loads"]
    # The expanding norm reads B in 16-byte vectors (8 ranks of a column a thread), as the row.
    assert report["add_rms_norm expand"]["load bits"].get("128", 0) >= 16  # (JSON keys are strings)


def test_bf16_is_rounded_by_the_hardware_convert(report):
    """round_low on the GPU: cvt.rn.bf16x2.f32 (F2FP ... PACK_AB), none of the bit arithmetic the interpreter's
    path does (a shift, a one-bit extract, an add of 0x7fff)."""
    for name, v in report.items():
        assert "F2FP.BF16.F32.PACK_AB" in v["opcodes"], name
        assert v["bit roundings"] == 0, name


def test_interpreted_kernels_are_refused_with_a_message():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_sass"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "TRITON_INTERPRET" in out.stderr


def test_the_rows_expand_reads_b_in_16_byte_vectors(report):
    """lora_expand_rows loads B's tile (ranks contiguous) as 16-byte vectors, never element by element: 512 x 16 or
    128 x 64 bf16 over 128 threads is 8 vectors a thread, and only the row's y, output row and tables besides."""
    for name in ("lora_expand_rows r16", "lora_expand_rows r64"):
        bits = report[name]["load bits"]
        assert bits.get("128", 0) >= 8, (name, bits)
        assert bits.get("16", 0) <= 1, (name, bits)  # at most the output tile's one narrow load a thread
