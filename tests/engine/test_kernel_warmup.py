"""The Triton LoRA backend compiles before serving every shrink config a step can pick (a first compile inside a
step stalled it ~1.5 s on an H100): its warm-up runs each token count and adapter count a step rounds to, also
for steps whose adapters hold one or two tokens each, which pick configs of their own (kernels.lora_shrink's
`spread` rule). Here on the CPU under Triton's interpreter, at small sizes, with every step's shrink segmented."""

from __future__ import annotations

import torch

import kernels.engine_backend as engine_backend
from gpu_worker.engine.lora.backends import TritonBackend
from gpu_worker.engine.lora.slot_buffers import SlotBuffers

from .test_slot_buffers import CFG


def test_warmup_compiles_every_shrink_config_a_step_picks(monkeypatch):
    monkeypatch.setattr(engine_backend, "ROWS_MAX_TOKENS", 0)  # every shrink segmented, as past 64 tokens
    picked: list = []
    default = engine_backend.default_config
    monkeypatch.setattr(engine_backend, "default_config",
                        lambda x, a, meta: picked.append((tuple(a.shape[1:]), cfg := default(x, a, meta))) or cfg)
    backend = TritonBackend(SlotBuffers(CFG, 8, 16, torch.device("cpu"), torch.float32), torch.device("cpu"),
                            max_tokens=24)
    backend.warmup()
    warmed = set(picked)
    assert any(cfg.num_warps == 2 and cfg.block_k == 128 for _, cfg in warmed)  # the spread-thin configs too
    picked.clear()
    steps = [[(0, 1), (1, 1), (2, 1)], [(0, 2), (1, 2), (2, 2), (3, 1), (-1, 3)], [(s, 2) for s in range(8)],
             [(s, 1) for s in range(8)] + [(-1, 5)], [(0, 20), (1, 4)], [(s, 3) for s in range(7)]]
    for runs in steps:
        hook = backend.bind(runs, None)
        t = sum(n for _, n in runs)
        for group, a in backend.buffers.a[0].items():
            out = torch.zeros(t, sum(b.shape[1] for b in backend.buffers.b[0][group]))
            hook.apply(0, group, torch.randn(t, a.shape[-1]), out)
    assert picked and set(picked) <= warmed, set(picked) - warmed
