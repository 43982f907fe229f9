"""SlotCopy (one launch scattering a device image into a slot's pieces) against its torch reference: fresh random
images, every destination poisoned with NaN first; pieces smaller than, equal to and past a chunk, several slots
(only the one copied changes), the rank written after, and the checks."""

from __future__ import annotations

import pytest
import torch

from kernels.slot_copy import CHUNK, SlotCopy, slot_copy_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def slots_of(sizes: list[int], num_slots: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[list]]:
    """Per slot, pieces of these sizes carved from a few NaN-filled tensors (as A rows under base weights are)."""
    stores = [torch.full((num_slots, n + 3), float("nan"), device=DEVICE, dtype=dtype) for n in sizes]
    return stores, [[s[slot, 3:] for s in stores] for slot in range(num_slots)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("sizes", [[5, 17], [CHUNK, 1, CHUNK + 9, 2 * CHUNK + 3], [40000]])
def test_matches_the_reference_and_touches_only_its_slot(sizes, dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    stores, pieces = slots_of(sizes, 3, dtype)
    ref_stores, ref_pieces = slots_of(sizes, 3, dtype)
    plan = SlotCopy(pieces, DEVICE)
    ranks = torch.full((3,), -7, dtype=torch.int32, device=DEVICE)
    for slot in (2, 0):
        image = torch.randn(sum(sizes), generator=g).to(DEVICE, dtype)
        plan.copy(slot, image, ranks, 11 + slot)
        slot_copy_ref(ref_pieces[slot], image)
        for got, want in zip(pieces[slot], ref_pieces[slot], strict=True):
            assert torch.equal(got, want)
        assert int(ranks[slot]) == 11 + slot
    for s, r in zip(stores, ref_stores, strict=True):
        assert s[1].isnan().all() and s[:, :3].isnan().all()  # the slot never copied, the rows' heads: untouched
        assert torch.equal(s.nan_to_num(), r.nan_to_num())
    assert int(ranks[1]) == -7


def test_checks():
    _, pieces = slots_of([8, 8], 2, torch.float32)
    plan = SlotCopy(pieces, DEVICE)
    ranks = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="16 contiguous"):
        plan.copy(0, torch.randn(15, device=DEVICE), ranks, 1)
    with pytest.raises(ValueError, match="out of range"):
        plan.copy(2, torch.randn(16, device=DEVICE), ranks, 1)
    with pytest.raises(ValueError, match="sized alike"):
        SlotCopy([pieces[0], pieces[1][:1]], DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        SlotCopy([[torch.zeros(4, 4, device=DEVICE).t()]], DEVICE)
