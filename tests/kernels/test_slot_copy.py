"""SlotCopy (one launch scattering a device image into a slot's pieces, or gathering them back) against its torch
reference: fresh random images, every destination poisoned with NaN first; contiguous pieces smaller than, equal to
and past a chunk, blocks whose rows are narrower than the image's (a B at a smaller rank stride), wider (zeros past
the image's values: an image at a smaller stride than the slots'), rows longer than a chunk (an A), several slots
(only the one copied changes), the rank written after or not, and the checks."""

from __future__ import annotations

import pytest
import torch

from kernels.slot_copy import CHUNK, SlotCopy, slot_copy_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (rows, width, image row stride, values of a row copied) per piece; stride = width = copy: contiguous.
CONTIGUOUS = [(1, 5, 5, 5), (1, 17, 17, 17), (1, CHUNK, CHUNK, CHUNK), (3, 7, 7, 7),
              (1, CHUNK + 9, CHUNK + 9, CHUNK + 9), (2, CHUNK + 1, CHUNK + 1, CHUNK + 1)]
STRIDED = [(2500, 16, 64, 16), (9, 3, 5, 3), (3, CHUNK + 5, CHUNK + 40, CHUNK + 5), (1, 8, 8, 8), (7000, 2, 2, 2)]
# Slot rows wider than the image's (zeros past `copy`), a long row's copy ending inside and before its last chunk.
PADDED = [(300, 64, 16, 16), (2, 2 * CHUNK + 64, CHUNK + 3, CHUNK + 3), (1, 3 * CHUNK, CHUNK // 2, CHUNK // 2),
          (4, 8, 8, 8), (5, 16, 4, 3)]


def slots_of(shapes: list[tuple[int, int, int, int]], num_slots: int, dtype: torch.dtype):
    """(stores, pieces per slot, image size): each slot's blocks carved from NaN-filled stores (as A rows under base
    weights are), placed one after another in the image."""
    stores = [torch.full((num_slots, rows * width + 3), float("nan"), device=DEVICE, dtype=dtype)
              for rows, width, _, _ in shapes]
    at, places = 0, []
    for rows, _, stride, _ in shapes:
        places.append((at, stride))
        at += rows * stride
    pieces = [[(s[slot, 3:].view(rows, width), p_at, stride, copy)
               for s, (rows, width, _, copy), (p_at, stride) in zip(stores, shapes, places, strict=True)]
              for slot in range(num_slots)]
    return stores, pieces, at


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shapes", [CONTIGUOUS, STRIDED, PADDED], ids=["contiguous", "strided", "padded"])
def test_matches_the_reference_and_touches_only_its_slot(shapes, dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    stores, pieces, size = slots_of(shapes, 3, dtype)
    ref_stores, ref_pieces, _ = slots_of(shapes, 3, dtype)
    plan = SlotCopy(pieces, DEVICE)
    assert plan.numel <= size
    ranks = torch.full((3,), -7, dtype=torch.int32, device=DEVICE)
    for slot in (2, 0):
        image = torch.randn(size, generator=g).to(DEVICE, dtype)
        plan.copy(slot, image, ranks, 11 + slot)
        slot_copy_ref(ref_pieces[slot], image)
        for (got, *_), (want, *_), (*_, copy) in zip(pieces[slot], ref_pieces[slot], shapes, strict=True):
            assert not got.isnan().any() and torch.equal(got, want)
            assert not got[:, copy:].any() and (copy == 0 or got[:, :copy].any())  # zeros past the copy
        assert int(ranks[slot]) == 11 + slot
    for s, r in zip(stores, ref_stores, strict=True):
        assert s[1].isnan().all() and s[:, :3].isnan().all()  # the slot never copied, the rows' heads: untouched
        assert torch.equal(s.nan_to_num(), r.nan_to_num())
    assert int(ranks[1]) == -7
    plan.copy(1, torch.randn(size, generator=g).to(DEVICE, dtype), ranks, -1)  # a negative rank: not written
    assert int(ranks[1]) == -7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shapes", [STRIDED, PADDED], ids=["strided", "padded"])
def test_gather_writes_the_slots_blocks_back_into_the_image(shapes, dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    _, pieces, size = slots_of(shapes, 2, dtype)
    plan = SlotCopy(pieces, DEVICE)
    ranks = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    image = torch.randn(size, generator=g).to(DEVICE, dtype)
    plan.copy(1, image, ranks, 3)
    got = torch.full((size,), float("nan"), device=DEVICE, dtype=dtype)
    want = got.clone()
    plan.gather(1, got)
    slot_copy_ref(pieces[1], want, gather=True)
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
    # The blocks hold the image's values; what lies between them in the image (the strides' tails) is untouched.
    covered = ~want.isnan()
    assert covered.any() and (~covered).any()
    assert torch.equal(got[covered], image[covered])
    assert int(ranks[1]) == 3


def test_checks():
    _, pieces, _ = slots_of([(1, 8, 8, 8), (2, 4, 4, 4)], 2, torch.float32)
    plan = SlotCopy(pieces, DEVICE)
    ranks = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="at least 16 contiguous"):
        plan.copy(0, torch.randn(15, device=DEVICE), ranks, 1)
    with pytest.raises(ValueError, match="out of range"):
        plan.copy(2, torch.randn(16, device=DEVICE), ranks, 1)
    with pytest.raises(ValueError, match="placed alike"):
        SlotCopy([pieces[0], pieces[1][:1]], DEVICE)
    with pytest.raises(ValueError, match="contiguous rows"):
        SlotCopy([[(torch.zeros(4, 4, device=DEVICE).t(), 0, 4, 4)]], DEVICE)
    with pytest.raises(ValueError, match="at most a row"):
        SlotCopy([[(torch.zeros(4, 4, device=DEVICE), 0, 8, 5)]], DEVICE)
