"""argmax_rows against torch.argmax: fresh random logits (bf16 and fp32, widths that are and are not a multiple
of the block), ties (the first index wins), a maximum in the last, ragged block, strided rows."""

from __future__ import annotations

import pytest
import torch

from kernels.argmax import argmax_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,width", [(1, 7), (5, 2048), (9, 5000), (3, 4097)])
def test_matches_torch(rows, width, dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(rows, width, generator=g).to(DEVICE, dtype)
    # Ties: small integers repeat the maximum many times in a row; torch.argmax returns the first.
    ties = torch.randint(-3, 4, (rows, width), generator=g).to(DEVICE, dtype)
    last = x.clone()
    last[:, -1] = 100.0  # the maximum in the last (ragged) block
    for t in (x, ties, last):
        assert torch.equal(argmax_rows(t), t.argmax(-1))


def test_strided_rows_and_checks():
    x = torch.randn(4, 3000, device=DEVICE)[:, :2500]  # rows 3000 apart
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert argmax_rows(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="contiguous"):
        argmax_rows(x.t())
