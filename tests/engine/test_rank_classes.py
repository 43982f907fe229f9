"""The slots' rank stride follows the adapters they hold (SlotBuffers' rank classes): with max_lora_rank 64,
adapters of rank <= 16 are laid out, read and multiplied at 16; one of rank 32 moves every slot to 64 (the adapters
already there keep their weights), and once it leaves they move back. Tokens and logprobs match transformers + PEFT
at every stride, for base and adapter requests mixed; the Triton copy kernel moves slots as its torch reference
does."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.engine import LLM
from gpu_worker.engine.lora.slot_buffers import SlotBuffers, rank_classes

from .test_oracle import PROMPTS, _check
from .test_slot_buffers import CFG, adapter, assert_holds, layers


def test_rank_classes():
    assert rank_classes(8) == (8,)
    assert rank_classes(16) == (16,)
    assert rank_classes(32) == (16, 32)
    assert rank_classes(64) == (16, 64)
    assert rank_classes(256) == (16, 64, 256)


@pytest.mark.parametrize("stacked,copy_kernel", [(False, False), (True, False), (True, True)],
                         ids=["flat", "stacked", "stacked-copy-kernel"])
def test_relayout_keeps_the_kept_slots_and_empties_the_others(stacked, copy_kernel):
    device = torch.device("cuda" if copy_kernel and torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    buffers = SlotBuffers(CFG, 4, 32, device, torch.float32, copy_kernel=copy_kernel)
    if stacked:
        weights = layers(g, device)
        before = [{grp: getattr(w, grp).clone() for grp in buffers.shapes} for w in weights]
        buffers.attach_base(weights)
    assert buffers.classes == (16, 32) and buffers.rank_class == 16
    small = [adapter(g, 8), adapter(g, 16, ("q_proj", "down_proj")), adapter(g, 4)]
    for slot, a in zip((0, 1, 3), small, strict=True):
        buffers.load(slot, buffers.pack(a, pin=False), a.max_rank, buffers.groups_of(a))
    wide = adapter(g, 32)
    # Each image at its adapter's class: rank 8 at 16, half of rank 32's (pinned host memory, the copy in).
    assert 2 * buffers.pack(small[0], pin=False).numel() == buffers.pack(wide, pin=False).numel() == buffers.per_slot
    with pytest.raises(ValueError, match="not a rank-8"):
        buffers.load(2, buffers.pack(wide, pin=False), 8, buffers.groups_of(wide))
    with pytest.raises(ValueError, match="does not fit"):
        buffers.load(2, buffers.pack(wide, pin=False), 32, buffers.groups_of(wide))
    buffers.relayout(32, keep=[0, 1])  # slot 3 is dropped
    assert buffers.rank_class == 32 and buffers.a[0]["qkv"].shape[2] == 32 and buffers.b[0]["o"][0].shape[2] == 32
    buffers.load(2, buffers.pack(wide, pin=False), 32, buffers.groups_of(wide))
    for slot, a in ((0, small[0]), (1, small[1]), (2, wide)):
        assert_holds(buffers, slot, a)
    assert buffers.ranks.tolist() == [8, 16, 32, 0] and buffers.groups[3] == frozenset()
    buffers.relayout(16, keep=[0, 1])  # the wide one leaves
    assert buffers.rank_class == 16
    for slot, a in ((0, small[0]), (1, small[1])):
        assert_holds(buffers, slot, a)
    assert buffers.ranks.tolist() == [8, 16, 0, 0]
    if stacked:  # the base weights never move
        for layer, w in enumerate(weights):
            for grp in buffers.shapes:
                assert torch.equal(getattr(w, grp), before[layer][grp])


def test_engine_moves_strides_with_the_adapters_and_matches_peft(tiny_model_dir, tiny_adapters, rank32_adapter):
    adapters = dict(tiny_adapters, **{"wide-lora": rank32_adapter})
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=3, max_lora_rank=64, num_kv_blocks=128)
    buffers = llm.engine.lora.buffers
    assert buffers.classes == (16, 64)
    _check(llm, tiny_model_dir, PROMPTS[:4], adapters, [None, "sql-lora", "chat-lora", "code-lora"])
    assert buffers.rank_class == 16  # ranks 4, 8 and 16: read at 16, not 64
    # A rank-32 adapter takes the least recently used slot; the two others stay, moved to stride 64.
    _check(llm, tiny_model_dir, PROMPTS[:4], adapters, ["wide-lora", "code-lora", None, "chat-lora"])
    assert buffers.rank_class == 64
    resident = {key[0] for key in llm.engine.lora.slots.resident()}
    assert "wide-lora" in resident and len(resident) == 3
    # It leaves its slot to a small one (the slots then hold ranks <= 16): back to 16, and still right.
    _check(llm, tiny_model_dir, PROMPTS[:3], adapters, ["math-lora", "sql-lora", "chat-lora"])
    _check(llm, tiny_model_dir, PROMPTS[:3], adapters, ["code-lora", "math-lora", "sql-lora"])
    assert "wide-lora" not in {key[0] for key in llm.engine.lora.slots.resident()}
    assert buffers.rank_class == 16
    # Unloading moves it back too: wide-lora in again (64), then evicted by name (16).
    _check(llm, tiny_model_dir, PROMPTS[:1], adapters, ["wide-lora"])
    assert buffers.rank_class == 64
    assert llm.engine.lora.evict("wide-lora") == 1 and buffers.rank_class == 16
    _check(llm, tiny_model_dir, PROMPTS[:2], adapters, ["chat-lora", None])
    assert llm.engine.blocks.num_free == 128
