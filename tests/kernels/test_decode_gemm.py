"""kernels/decode_gemm.py against a float64 reference: fresh random inputs, NaN-poisoned outputs, K whole and
split over programs (the last split of each tile adding the parts), ragged edges in every dimension."""

from __future__ import annotations

import pytest
import torch

from kernels.decode_gemm import DecodeGemm, GemmConfig, decode_gemm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("m,n,k,config", [
    (1, 40, 48, GemmConfig(block_n=16, block_k=16, split_k=1)),
    (5, 96, 200, GemmConfig(block_n=32, block_k=16, split_k=3)),   # 200 = 3 splits of 80, the last short
    (33, 40, 64, GemmConfig(block_n=16, block_k=32, split_k=2)),   # 33 rows in a 64-row block
    (16, 24, 40, GemmConfig(block_n=16, block_k=16)),              # splits chosen from the GPU's size
])
def test_matches_reference(m, n, k, config, dtype):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) * k ** -0.5).to(dtype)
    gemm = DecodeGemm(m, n, k, DEVICE, config)
    ref = x.double() @ w.double().T
    for _ in range(2):  # the semaphores are re-armed for the next launch
        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
        gemm(x, w, out)
        assert not out.isnan().any()
        assert rel_err(out, ref) <= TOLERANCE[dtype]
        assert not gemm.sem.any()
    if config.split_k:
        assert gemm.splits == config.split_k


def test_strided_rows_and_the_one_off_call():
    x = torch.randn(7, 96, device=DEVICE)[:, :48]
    w = torch.randn(80, 48, device=DEVICE)
    torch.testing.assert_close(decode_gemm(x, w, GemmConfig(block_n=16, block_k=16, split_k=2)), x @ w.T,
                               rtol=1e-4, atol=1e-4)


def test_input_checks():
    gemm = DecodeGemm(4, 32, 48, DEVICE)
    with pytest.raises(ValueError, match="planned for"):
        gemm(torch.zeros(5, 48, device=DEVICE), torch.zeros(32, 48, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        gemm(torch.zeros(48, 4, device=DEVICE).T, torch.zeros(32, 48, device=DEVICE))
    with pytest.raises(ValueError, match="rows"):
        DecodeGemm(129, 32, 48, DEVICE)
