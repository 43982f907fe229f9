"""SlotBuffers with every projection's A stacked under its base weight (attach_base): the base weight keeps its
values as a view, one GEMM over a prefix computes the base output and each slot's shrink, adapters loaded before
and after land where the kernels read them; and the decode graphs' choice of how many slots to stack."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.engine.decode_graphs import LORA_VARIANTS, DecodeGraphs, stacked_prefixes
from gpu_worker.engine.lora.layout import MODULE_GROUP
from gpu_worker.engine.lora.peft_adapter import AdapterWeights
from gpu_worker.engine.lora.slot_buffers import SlotBuffers
from gpu_worker.engine.model.config import ModelConfig
from gpu_worker.engine.model.llama import LayerWeights

CFG = ModelConfig(architecture="LlamaForCausalLM", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, vocab_size=64, rms_norm_eps=1e-5, max_position_embeddings=64,
                  tie_word_embeddings=False, qkv_bias=False, rope_theta=10000.0)


def layers(g: torch.Generator, device: str | torch.device = "cpu") -> list[LayerWeights]:
    h, i, q, kv = CFG.hidden_size, CFG.intermediate_size, CFG.q_size, CFG.kv_size
    return [LayerWeights(input_norm=torch.ones(h), qkv=torch.randn(q + 2 * kv, h, generator=g).to(device),
                         qkv_bias=None, o=torch.randn(h, q, generator=g).to(device), post_norm=torch.ones(h),
                         gate_up=torch.randn(2 * i, h, generator=g).to(device),
                         down=torch.randn(h, i, generator=g).to(device))
            for _ in range(CFG.num_layers)]


def adapter(g: torch.Generator, rank: int, modules=tuple(MODULE_GROUP)) -> AdapterWeights:
    buffers_shapes = SlotBuffers(CFG, 1, rank, torch.device("cpu"), torch.float32).shapes
    out = AdapterWeights("a", "h", max_rank=rank)
    for layer in range(CFG.num_layers):
        for m in modules:
            group, index = MODULE_GROUP[m]
            s = buffers_shapes[group]
            out.modules[layer, m] = (torch.randn(rank, s.in_features, generator=g),
                                     torch.randn(s.slice_widths[index], rank, generator=g))
    return out


def assert_holds(buffers: SlotBuffers, slot: int, a: AdapterWeights) -> None:
    """The slot's A and B views hold the adapter (zero past its rank)."""
    for (layer, m), (wa, wb) in a.modules.items():
        group, index = MODULE_GROUP[m]
        r = wa.shape[0]
        got_a = buffers.a[layer][group][slot, index].cpu()
        assert torch.equal(got_a[:r], wa) and not got_a[r:].any()
        got_b = buffers.b[layer][group][index][slot].cpu()
        assert torch.equal(got_b[:, :r], wb) and not got_b[:, r:].any()


@pytest.mark.parametrize("copy_kernel", [False, True], ids=["torch-copies", "slot-copy-kernel"])
def test_attach_base_stacks_a_under_the_base_weights_and_loads_land_there(copy_kernel):
    # The copy kernel runs on the GPU where there is one (Triton's interpreter on CPU tensors elsewhere).
    device = torch.device("cuda" if copy_kernel and torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(7)
    buffers = SlotBuffers(CFG, 3, 8, device, torch.float32)
    weights = layers(g, device)
    before = [{grp: getattr(w, grp).clone() for grp in buffers.shapes} for w in weights]
    first, second = adapter(g, 8), adapter(g, 5, ("q_proj", "v_proj", "down_proj"))
    buffers.load(1, buffers.pack(first, pin=False), 8, buffers.groups_of(first))
    nbytes = buffers.nbytes()

    buffers.attach_base(weights, copy_kernel=copy_kernel)
    assert buffers.a_flat is None and buffers.nbytes() == nbytes
    for layer, w in enumerate(weights):
        for grp in buffers.shapes:
            base, stacked, a = getattr(w, grp), buffers.stacked[layer][grp], buffers.a[layer][grp]
            n = base.shape[0]
            assert torch.equal(base, before[layer][grp])  # the same values, now a view of the stacked tensor
            assert base.data_ptr() == stacked.data_ptr() and a.data_ptr() == stacked[n:].data_ptr()
            assert stacked.shape == (n + 3 * a.shape[1] * 8, base.shape[1])
    assert_holds(buffers, 1, first)  # loaded before: carried over

    # into the stacked rows; the hook runs once the image is on its way and before the slot is written
    seen = []
    buffers.load(2, buffers.pack(second, pin=False), 5, buffers.groups_of(second),
                 before_scatter=lambda: seen.append((buffers.a[0]["qkv"][2].abs().sum().item(),
                                                     buffers.ranks[2].item())))
    assert seen == [(0.0, 0)]
    assert_holds(buffers, 2, second)
    assert_holds(buffers, 1, first)
    assert buffers.ranks.tolist() == [0, 8, 5]
    assert not buffers.a[0]["qkv"][0].any()  # an empty slot stays empty

    # One GEMM over the first P slots' rows: the base output, then x @ A[slot, slice].T for each slot and slice.
    x = torch.randn(5, CFG.hidden_size, generator=g).to(device)
    a = buffers.a[1]["gate_up"]
    s, r = a.shape[1], a.shape[2]
    n = weights[1].gate_up.shape[0]
    out = F.linear(x, buffers.stacked[1]["gate_up"][: n + 2 * s * r])
    torch.testing.assert_close(out[:, :n], F.linear(x, before[1]["gate_up"]))
    y = out[:, n:].view(5, 2, s, r)
    torch.testing.assert_close(y[:, 1], torch.einsum("ti,sri->tsr", x, a[1]))

    buffers.attach_base(weights)  # a second call changes nothing
    assert torch.equal(weights[0].qkv, before[0]["qkv"])


def test_stacked_prefixes_and_the_graph_a_batch_replays():
    assert stacked_prefixes(32) == [1, 2, 4, 8, 16, 32]
    assert stacked_prefixes(12) == [1, 2, 4, 8, 12]
    assert stacked_prefixes(1) == [1]
    every = frozenset({"qkv", "o", "gate_up", "down"})
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # find() alone: which captured graph a batch replays
    graphs.buckets, graphs.prefixes, graphs.stacked_max_batch = [4, 64, 128, 512], [8, 16, 32], 64
    buffers = SimpleNamespace(classes=(16, 64), rank_class=16)
    graphs.lora = SimpleNamespace(graphable=True, spread_rows=2, spread_tokens=256, buffers=buffers)
    graphs.graphs = {key: None for b in graphs.buckets for key in graphs.keys(b)}
    assert set(graphs.keys(128)) == {(128, None, None, False, None)} | {
        (128, v, None, s, r) for v in LORA_VARIANTS for s in (False, True) for r in (16, 64)}
    assert all(not spread for *_, spread, _ in graphs.keys(512) + graphs.keys(64))  # past spread_tokens; stacked
    assert graphs.find(3, None, None) == (4, None, None, False, None)
    assert graphs.find(3, every, [0, 7, -1]) == (4, every, 8, False, 16)  # slots 0..7: the first 8 stacked
    assert graphs.find(3, every, [8, -1, 2]) == (4, every, 16, False, 16)
    assert graphs.find(40, every, [31]) == (64, every, 32, False, 16)
    # Past STACKED_MAX_BATCH: not stacked; the spread graph where no slot holds more than 2 sequences.
    assert graphs.find(100, every, [31, 31, 5, -1, -1, -1]) == (128, every, None, True, 16)
    assert graphs.find(100, every, [31, 31, 5, 31]) == (128, every, None, False, 16)
    assert graphs.find(300, every, [0, 1]) == (512, every, None, False, 16)
    assert graphs.find(600, every, [0]) is None  # no bucket
    buffers.rank_class = 64  # the slots at stride 64: that stride's graphs
    assert graphs.find(3, every, [0, 7, -1]) == (4, every, 8, False, 64)
    assert graphs.find(3, None, None) == (4, None, None, False, None)


def test_b_runs_cover_each_layers_b_in_a_slots_row():
    """b_runs: where a layer's B lies in b_flat's rows, the groups asked for merged where adjacent; every B view of
    the layer lies in its runs, and nothing else of the layer's does."""
    buffers = SlotBuffers(CFG, 3, 4, torch.device("cpu"), torch.float32)
    base = buffers.b_flat.data_ptr()
    size = buffers.b_flat.element_size()

    def spans(layer, groups):  # (offset, values) of each B view of the layer's groups, in a slot's row
        return sorted(((bs.data_ptr() - base) // size, bs[0].numel())
                      for g in groups for bs in buffers.b[layer][g])

    for layer in range(CFG.num_layers):
        every = buffers.b_runs(layer)
        assert len(every) == 1
        views = spans(layer, buffers.shapes)
        assert every[0] == (views[0][0], sum(n for _, n in views))
        assert views[-1][0] + views[-1][1] == every[0][0] + every[0][1]
        qkv_o = buffers.b_runs(layer, frozenset({"qkv", "o"}))
        assert len(qkv_o) == 1 and qkv_o[0][0] == every[0][0]
        assert qkv_o[0][1] == sum(n for _, n in spans(layer, ["qkv", "o"]))
        apart = buffers.b_runs(layer, frozenset({"qkv", "down"}))  # gate_up and o between them
        assert [r[0] for r in apart] == [spans(layer, ["qkv"])[0][0], spans(layer, ["down"])[0][0]]


def test_the_norms_prefetch_spans_split_the_stacked_groups_b():
    """What each norm asks into L2 (kernels.engine_backend.prefetch_span over b_runs): with every group stacked
    (P <= 32) the input norm asks for the layer's whole B and the post-attention norm for nothing; with gate_up's
    LoRA beside its GEMM (past 32), the input norm asks for qkv's and o's B and the post-attention norm for down's;
    a q/v batch asks for qkv's alone."""
    from kernels.engine_backend import STACKED_GROUPS, prefetch_span

    buffers = SlotBuffers(CFG, 3, 4, torch.device("cpu"), torch.float32)
    base, size = buffers.b_flat.data_ptr(), buffers.b_flat.element_size()

    def span_of(layer, groups):  # [start, end) of the groups' B views in a slot's row
        views = [bs for g in groups for bs in buffers.b[layer][g]]
        return (min((v.data_ptr() - base) // size for v in views),
                max((v.data_ptr() - base) // size + v[0].numel() for v in views))

    layer = CFG.num_layers - 1
    every = STACKED_GROUPS | {"gate_up"}
    assert prefetch_span(buffers.b_runs(layer, every), "input") == span_of(layer, every)
    assert prefetch_span(buffers.b_runs(layer, every), "post") is None
    assert prefetch_span(buffers.b_runs(layer, STACKED_GROUPS), "input") == span_of(layer, ["qkv", "o"])
    assert prefetch_span(buffers.b_runs(layer, STACKED_GROUPS), "post") == span_of(layer, ["down"])
    qv = STACKED_GROUPS & frozenset({"qkv"})
    assert prefetch_span(buffers.b_runs(layer, qv), "input") == span_of(layer, ["qkv"])
    assert prefetch_span(buffers.b_runs(layer, qv), "post") is None
