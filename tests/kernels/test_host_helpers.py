"""The host-side integer helpers that replace triton.cdiv / triton.next_power_of_2 in launch code (those are
ConstexprFunctions in Triton 3.x, ~6 us a call from Python): the same values, and the benchmark that watches
the host time around each LoRA launch runs."""

from __future__ import annotations

import triton

from benchmarks import lora_host
from kernels._common import cdiv, next_pow2


def test_same_values_as_triton():
    for n in [*range(0, 600), 1023, 1024, 1025, 8191, 8192, 14336, 2**20 + 1]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 128, 256):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_the_host_overhead_benchmark_runs(capsys):
    assert lora_host.main(["--calls", "8"]) == 0
    assert "us a call" in capsys.readouterr().out
