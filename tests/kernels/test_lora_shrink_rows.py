"""The per-token shrink of decode steps (kernels/lora_shrink_rows.py) against the float64 reference, on the
cases of test_lora_ops (NaN-poisoned y, NaN past each slot's rank in A), and the engine hook's choice
between it and the segmented shrink."""

from __future__ import annotations

import pytest
import torch

import kernels.engine_backend as engine_backend
from gpu_worker.engine.lora.torch_backend import LoRABatch
from kernels import KernelConfig, LoRAKernelMeta, lora_shrink_ref
from kernels.lora_shrink_rows import lora_shrink_rows, shrink_rows_config

from .test_lora_ops import (
    CASES,
    DEVICE,
    DTYPES,
    TINY,
    TOLERANCE,
    _compare_backends,
    _engine_case,
    make_case,
    random_slots,
    ref_inputs,
    rel_err,
)


def check_rows(c, config=None):
    x, a, _ = ref_inputs(c)
    t, (s, r) = c.x.shape[0], c.a.shape[1:3]
    y = torch.full((t, s, r), float("nan"), dtype=torch.float32, device=DEVICE)
    lora_shrink_rows(c.x, c.a, c.ranks, c.token_slots, y, config)
    ref = lora_shrink_ref(x, a, c.ranks, c.token_slots)
    has = c.token_slots >= 0
    if has.any():
        assert not y[has].isnan().any()
        assert rel_err(y[has], ref[has]) <= TOLERANCE[c.x.dtype]
    # Rows of tokens without an adapter are not written.
    assert y[~has].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name, dtype):
    slots, ranks = CASES[name]()
    check_rows(make_case(slots, ranks, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_blocks_and_ragged_k(dtype):
    """Blocks smaller than the shapes: several programs per token over S*R (a block straddling two slices),
    K in several blocks, the last one partial (in 40 over blocks of 16)."""
    c = make_case(random_slots(13, 4, 0.2), [16, 3, 9, 12], widths=(8, 16, 24), in_features=40, dtype=dtype)
    check_rows(c, KernelConfig(1, 8, 16, num_warps=1, num_stages=1))
    check_rows(c, KernelConfig(1, 32, 16, num_warps=2, num_stages=1))


def test_config_fits_the_shapes():
    # qkv at rank 16 (N = 48): two programs a token, K in blocks of 1,024; down_proj (in 8,192, N = 16).
    assert (shrink_rows_config(2048, 48).block_n, shrink_rows_config(2048, 48).block_k) == (32, 1024)
    assert (shrink_rows_config(8192, 16).block_n, shrink_rows_config(8192, 16).block_k) == (16, 1024)
    assert shrink_rows_config(48, 3).block_k == 64


def test_input_checks():
    c = make_case([0, 1], [16, 16])
    with pytest.raises(ValueError, match="token_slots"):
        lora_shrink_rows(c.x, c.a, c.ranks, c.token_slots[:1])
    with pytest.raises(ValueError, match="token_slots"):
        lora_shrink_rows(c.x, c.a, c.ranks, c.token_slots.long())
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink_rows(c.x.double(), c.a, c.ranks, c.token_slots)
    with pytest.raises(ValueError, match="y must be"):
        lora_shrink_rows(c.x, c.a, c.ranks, c.token_slots, y=torch.zeros(2, 3, 16, device=DEVICE).half())


@pytest.mark.parametrize("rows_up_to", [0, 10**6], ids=["segmented", "per-token"])
def test_engine_hook_with_either_shrink(monkeypatch, rows_up_to):
    """TritonLoRA picks the shrink by the step's token count (per token up to ROWS_MAX_TOKENS): either way,
    across steps of other shapes, it matches the torch backend."""
    monkeypatch.setattr(engine_backend, "ROWS_MAX_TOKENS", rows_up_to)
    buffers, _ = _engine_case(TINY, [16, 0, 7, 12], [(0, 1)], 16, torch.float32)
    meta = LoRAKernelMeta(max_tokens=64, max_slots=4, device=DEVICE)
    hook = engine_backend.TritonLoRA(buffers, meta)
    for runs in ([(2, 2), (0, 3), (-1, 1)], [(1, 30), (3, 20)], [(0, 5), (2, 9), (-1, 4), (1, 7)]):
        _compare_backends(buffers, LoRABatch.from_runs(runs, DEVICE), meta, TINY, torch.float32, hook)
