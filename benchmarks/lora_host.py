"""Host time our code spends around each LoRA kernel launch: `TritonLoRA.apply` (configs, checks, grids) with
the Triton launches themselves replaced by no-ops, so it runs anywhere (no GPU) and measures only Python.

    python3 -m benchmarks.lora_host [--tokens 33] [--calls 640]

Llama-3.2-1B projection shapes, 16 slots of rank 16, 8 adapters in the step. An eager step (one that cannot
replay a CUDA graph: any step with a prompt in it) makes 4 such calls per layer, 64 for 16 layers.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

import torch


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextmanager
def launches_stubbed():
    import kernels.lora_expand  # noqa: F401 (the modules, not the functions kernels/__init__ re-exports)
    import kernels.lora_expand_rows  # noqa: F401
    import kernels.lora_shrink  # noqa: F401
    import kernels.lora_shrink_rows  # noqa: F401
    import kernels.metadata  # noqa: F401

    mods = [(sys.modules["kernels.lora_shrink"], "_shrink_kernel"),
            (sys.modules["kernels.lora_shrink_rows"], "_shrink_rows_kernel"),
            (sys.modules["kernels.lora_expand"], "_expand_kernel"),
            (sys.modules["kernels.lora_expand_rows"], "_expand_rows_kernel"),
            (sys.modules["kernels.metadata"], "_prepare_kernel")]
    saved = [getattr(m, name) for m, name in mods]
    for m, name in mods:
        setattr(m, name, _NoLaunch())
    try:
        yield
    finally:
        for (m, name), fn in zip(mods, saved):
            setattr(m, name, fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.lora_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--calls", type=int, default=640, help="apply calls timed, in steps of 64")
    args = p.parse_args(argv)
    from kernels.engine_backend import TritonLoRA
    from kernels.metadata import LoRAKernelMeta

    slots, r, h, inter = 16, 16, 2048, 8192
    groups = {"qkv": (h, [h, 512, 512]), "o": (h, [h]), "gate_up": (h, [inter, inter]), "down": (inter, [h])}

    class Buffers:
        a = [{g: torch.zeros(slots, len(w), r, k, dtype=torch.bfloat16) for g, (k, w) in groups.items()}]
        b = [{g: [torch.zeros(slots, n, r, dtype=torch.bfloat16) for n in w] for g, (k, w) in groups.items()}]
        shapes = {g: type("Shape", (), {"slice_offsets": tuple(sum(w[:i]) for i in range(len(w)))})
                  for g, (k, w) in groups.items()}
        ranks = torch.full((slots,), r, dtype=torch.int32)

    x = {g: torch.zeros(args.tokens, k, dtype=torch.bfloat16) for g, (k, w) in groups.items()}
    out = {g: torch.zeros(args.tokens, sum(w), dtype=torch.bfloat16) for g, (k, w) in groups.items()}
    token_slots = torch.randint(0, 8, (args.tokens,), dtype=torch.int32)
    steps = max(1, args.calls // 64)
    with launches_stubbed():
        hook = TritonLoRA(Buffers(), LoRAKernelMeta(256, slots, torch.device("cpu")))
        t = time.perf_counter()
        for _ in range(steps):  # a 16-layer eager step: prepare, then 4 projections a layer
            hook.prepare(token_slots, 8)
            for _layer in range(16):
                for g in groups:
                    hook.apply(0, g, x[g], out[g])
        per_step = (time.perf_counter() - t) / steps
    print(f"TritonLoRA.apply, host time around the launches: {per_step / 64 * 1e6:.1f} us a call, "
          f"{per_step * 1e3:.2f} ms for the prepare + 64 calls of a 16-layer eager step ({args.tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
