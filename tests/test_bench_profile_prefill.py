"""`python -m benchmarks.profile_prefill --tiny`: the prefill profiler runs end to end on the CPU (a small model),
and on resident adapters its rounds take a base round's steps and copy no adapter in."""

from __future__ import annotations

import re

from benchmarks import profile_prefill


def test_prefill_profiler_runs_and_adapter_rounds_copy_nothing(capsys):
    assert profile_prefill.main(["--tiny", "--shapes", "4x40", "--adapters", "2", "--rounds", "2", "--rows", "4",
                                 "--set", "kernels.elementwise.SILU_PROMPT_STAGES=1"]) == 0
    out = capsys.readouterr().out
    base = re.search(r"4 x 40, base: wall ms .*, steps \[(.*)\], adapter copies 0", out)
    lora = re.search(r"4 x 40, 2 adapters: wall ms .*, steps \[(.*)\], adapter copies 0", out)
    assert base and lora and base.group(1) == lora.group(1)
    assert re.search(r"4 x 40, 2 adapters, kernels.elementwise.SILU_PROMPT_STAGES=1: wall ms .*, adapter copies 0", out)
    assert "CPU us by kernel, base / 2 adapters" in out and "aten::mm" in out
