"""Plain-torch versions of the ops: float64 references for the tests, and the two fast torch paths the
benchmark compares against (a loop over adapters, and a per-token gather + bmm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _offsets(b: Sequence[torch.Tensor], slice_offsets: Sequence[int] | None) -> list[int]:
    widths = [bs.shape[1] for bs in b]
    return list(slice_offsets) if slice_offsets is not None else [sum(widths[:k]) for k in range(len(b))]


def _by_slot(token_slots: torch.Tensor):
    """(slot, token indices) for each slot present, host-side (a sync: fine for references)."""
    slots = token_slots.long()
    for slot in torch.unique(slots[slots >= 0]).tolist():
        yield slot, torch.nonzero(slots == slot).flatten()


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Semantics of `lora_shrink`, in float64: [T, S, R]; rows of tokens without an adapter are zero,
    as are columns at or past the slot's rank. One GEMM per slot present (no per-token weight copies, so
    it runs at Llama-8B sizes on a GPU)."""
    t = x.shape[0]
    _, s, r, _ = a.shape
    y = torch.zeros(t, s, r, dtype=torch.float64, device=x.device)
    for slot, idx in _by_slot(token_slots):
        k = int(ranks[slot])
        y[idx, :, :k] = torch.einsum("ti,sri->tsr", x[idx].double(), a[slot, :, :k].double())
    return y


def lora_expand_ref(
    y: torch.Tensor,
    b: Sequence[torch.Tensor],
    out: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics of `lora_expand`, in float64: returns out + delta (out itself is not modified)."""
    res = out.double()  # a copy unless out is already float64
    if res.data_ptr() == out.data_ptr():
        res = res.clone()
    offs = _offsets(b, slice_offsets)
    for slot, idx in _by_slot(token_slots):
        k = int(ranks[slot])
        factor = float(scale[slot]) if scale is not None else 1.0
        for s, (bs, off) in enumerate(zip(b, offs)):
            delta = y[idx, s, :k].double() @ bs[slot, :, :k].double().T
            res[idx, off:off + bs.shape[1]] += factor * delta
    return res


def lora_ref(x, a, b, out, ranks, token_slots, slice_offsets=None, scale=None) -> torch.Tensor:
    """Shrink then expand, float64 throughout: out + delta."""
    return lora_expand_ref(lora_shrink_ref(x, a, ranks, token_slots), b, out, ranks, token_slots, slice_offsets,
                           scale)


# ------------------------------------------------------------------ fast torch baselines (benchmark)
# Both read the zero-padded R columns rather than each slot's rank (the padding adds exactly zero).


def lora_loop(
    x: torch.Tensor,
    a: torch.Tensor,
    b: Sequence[torch.Tensor],
    out: torch.Tensor,
    segments: Sequence[tuple[int, int, int]],
    slice_offsets: Sequence[int] | None = None,
) -> None:
    """A loop over adapters, in place: segments are (slot, start, end) runs of tokens grouped by slot,
    as the engine lays them out (TorchLoRA's algorithm). One GEMM pair per adapter per slice."""
    offs = _offsets(b, slice_offsets)
    s, r = a.shape[1], a.shape[2]
    for slot, start, end in segments:
        y = (x[start:end] @ a[slot].reshape(s * r, -1).T).view(-1, s, r)
        for k, bs in enumerate(b):
            out[start:end, offs[k]:offs[k] + bs.shape[1]] += y[:, k] @ bs[slot].T


def lora_gather_bmm(
    x: torch.Tensor,
    a: torch.Tensor,
    b: Sequence[torch.Tensor],
    out: torch.Tensor,
    token_slots: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
) -> None:
    """Per-token gather of every token's A and B, then batched GEMVs, in place. Tokens without an
    adapter point at slot 0 and are masked out. Memory: T x (S*R*in + sum(out_s)*R) elements."""
    offs = _offsets(b, slice_offsets)
    t = x.shape[0]
    s, r = a.shape[1], a.shape[2]
    idx = token_slots.long().clamp(min=0)
    keep = (token_slots >= 0).to(x.dtype)[:, None, None]
    y = torch.bmm(a[idx].view(t, s * r, -1), x[:, :, None]).view(t, s, r) * keep
    for k, bs in enumerate(b):
        out[:, offs[k]:offs[k] + bs.shape[1]] += torch.bmm(bs[idx], y[:, k, :, None])[:, :, 0]


def gather_bmm_bytes(t: int, a: torch.Tensor, b: Sequence[torch.Tensor]) -> int:
    """Bytes of the gathered weights `lora_gather_bmm` materialises."""
    per_token = a[0].numel() + sum(bs[0].numel() for bs in b)
    return t * per_token * a.element_size()
