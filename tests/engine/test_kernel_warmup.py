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


def test_warmup_compiles_both_pipelines_of_silus_prompt_expand(monkeypatch):
    """Prompt steps past EXPAND_MAX_ROWS rows hand gate_up's part to silu_mul, whose loop over column tiles is
    pipelined deeper where a program walks many (kernels.elementwise.silu_prompt_grid): a compile-time constant, so
    the warm-up runs a step that picks each. Here the thresholds are scaled to the small model: 129 rows walk one
    tile a program, 320 two."""
    import kernels.elementwise as elementwise

    monkeypatch.setattr(elementwise, "SILU_PROMPT_PROGRAMS_PER_SM", 2)
    monkeypatch.setattr(elementwise, "SILU_PROMPT_DEEP_MIN_TILES", 2)
    used: list[int] = []
    launch = elementwise._silu_mul_prompt_expand
    monkeypatch.setattr(elementwise, "_silu_mul_prompt_expand",
                        lambda grid, *args, **kw: used.append(kw["STAGES"]) or launch(grid, *args, **kw))
    backend = TritonBackend(SlotBuffers(CFG, 8, 16, torch.device("cpu"), torch.float32), torch.device("cpu"),
                            max_tokens=320, consumer_expands=True)
    backend._warm_consumer_expand()
    warmed = set(used)
    assert warmed == {elementwise.SILU_PROMPT_STAGES, elementwise.SILU_PROMPT_SHALLOW_STAGES}
    used.clear()
    a = backend.buffers.a[0]["gate_up"]
    weight = torch.randn(2 * CFG.intermediate_size, a.shape[-1])
    for runs in ([(0, 100), (1, 29)], [(0, 150), (-1, 50)], [(2, 320)]):
        hook = backend.bind(runs, None)
        t = sum(n for _, n in runs)
        out, pending = hook.project(0, "gate_up", torch.randn(t, a.shape[-1]), weight, None)
        elementwise.silu_mul(out, pending)
    assert len(used) == 3 and set(used) <= warmed
