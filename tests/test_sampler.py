"""Sampler and SamplingParams: each sampling stage against its definition, on small handmade inputs."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.engine.errors import InvalidRequestError
from gpu_worker.engine.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_min_tokens,
    apply_penalties,
)
from gpu_worker.engine.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]
# A fixed distribution over a tiny vocabulary for the statistical checks.
PROBS = [0.5, 0.3, 0.15, 0.05]
DRAWS = 4000  # 4 sigma of a frequency near 0.5 is about 0.03


@pytest.fixture(autouse=True)
def _seed_shared_rng():
    # The shared noise comes from torch's default generator: seeding it makes these tests deterministic.
    torch.manual_seed(0)


def row(params: SamplingParams | None = None, prompt=(), output=(), generator=None, eos=None) -> SamplingRow:
    return SamplingRow(
        params=params or SamplingParams(),
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        generator=generator,
        eos_token_id=eos,
    )


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    batch = SamplingBatch.build(rows, logits.shape[1], logits.device)
    return Sampler()(logits, batch)


def fixed_logits(n: int, device="cpu") -> torch.Tensor:
    return torch.tensor(PROBS, device=device).log().expand(n, -1).contiguous()


def frequencies(tokens: torch.Tensor, vocab: int) -> list[float]:
    return (torch.bincount(tokens.cpu(), minlength=vocab).float() / tokens.numel()).tolist()


# --- greedy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device):
    logits = torch.randn(8, 50, device=device)
    before = logits.clone()
    out = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(8)])
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None
    assert torch.equal(logits, before), "the sampler must not edit the caller's logits"


def test_all_greedy_batch_skips_every_stage():
    rows = [row(SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.1)) for _ in range(3)]
    batch = SamplingBatch.build(rows, 10, "cpu")
    assert batch.all_greedy
    assert batch.temperatures is None and batch.top_k is None and batch.top_p is None and batch.min_p is None
    assert batch.penalties is None and batch.min_tokens_rows is None and batch.greedy_mask is None
    assert not batch.seeded and not batch.needs_shared_noise and batch.max_num_logprobs is None


def test_greedy_rows_in_a_mixed_batch_take_argmax():
    logits = torch.randn(6, 40)
    rows = [row(SamplingParams(temperature=0.0 if i % 2 else 1.5)) for i in range(6)]
    out = sample(logits, rows)
    assert torch.equal(out.token_ids[1::2], logits[1::2].argmax(-1))


def test_top_k_1_is_argmax_at_temperature_1():
    logits = torch.randn(16, 100)
    out = sample(logits, [row(SamplingParams(temperature=1.0, top_k=1)) for _ in range(16)])
    assert torch.equal(out.token_ids, logits.argmax(-1))


# --- seeds ----------------------------------------------------------------------------------------


def _seeded_run(seed: int, target: torch.Tensor, others: int, position: int, steps: int = 5) -> list[int]:
    """Tokens of one seeded request over `steps` steps, placed among `others` other rows."""
    device = target.device
    gen = torch.Generator(device=device).manual_seed(seed)
    other_gens = [torch.Generator(device).manual_seed(1000 + i) if i % 2 else None for i in range(others)]
    # Neighbours that switch on every stage, so the target row goes through them with neutral values.
    other_params = [
        dict(top_p=0.9, presence_penalty=0.5),
        dict(top_k=5, repetition_penalty=1.3),
        dict(min_p=0.05, temperature=0.0),
        dict(temperature=1.7, logprobs=3),
    ]
    tokens = []
    for _ in range(steps):
        rows = [
            row(SamplingParams(seed=1000 + i if g else None, **other_params[i % 4]), [1, 2], [3], generator=g)
            for i, g in enumerate(other_gens)
        ]
        rows.insert(position, row(SamplingParams(temperature=0.8, seed=seed), generator=gen))
        logits = torch.randn(len(rows), target.shape[0], device=device)
        logits[position] = target
        tokens.append(int(sample(logits, rows).token_ids[position]))
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_reproduces_across_batch_composition_and_position(device):
    target = torch.randn(500, device=device)
    alone = _seeded_run(7, target, others=0, position=0)
    assert alone == _seeded_run(7, target, others=5, position=3)
    assert alone == _seeded_run(7, target, others=9, position=9)
    # Some other seed should give another sequence, or the seed does nothing.
    assert any(_seeded_run(s, target, others=0, position=0) != alone for s in (8, 9, 10))


# --- top-k, top-p, min-p --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # Smallest set with mass >= p, renormalized: {0, 1} for 0.7, {0, 1, 2} for 0.85.
        (SamplingParams(top_p=0.7), [0.625, 0.375, 0.0, 0.0]),
        (SamplingParams(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (SamplingParams(top_p=0.4), [1.0, 0.0, 0.0, 0.0]),
        (SamplingParams(top_k=2), [0.625, 0.375, 0.0, 0.0]),
        # min_p keeps p >= min_p * 0.5: 0.2 -> 0.1 drops the last token, 0.5 -> 0.25 the last two.
        (SamplingParams(min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (SamplingParams(min_p=0.5), [0.625, 0.375, 0.0, 0.0]),
        # top-p applies to the top-k survivors: within {0, 1}, 0.625 < 0.7, so both stay.
        (SamplingParams(top_k=2, top_p=0.7), [0.625, 0.375, 0.0, 0.0]),
        # Within the top-3 (renormalized 0.53, 0.32, 0.16), 0.7 needs two tokens.
        (SamplingParams(top_k=3, top_p=0.7), [0.625, 0.375, 0.0, 0.0]),
        (SamplingParams(), PROBS),
    ],
    ids=[
        "top_p=0.7",
        "top_p=0.85",
        "top_p=0.4",
        "top_k=2",
        "min_p=0.2",
        "min_p=0.5",
        "top_k=2+top_p",
        "top_k=3+top_p",
        "plain",
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_truncation_samples_the_renormalized_support(params, expected, device):
    out = sample(fixed_logits(DRAWS, device), [row(params) for _ in range(DRAWS)])
    freq = frequencies(out.token_ids, len(PROBS))
    for f, e in zip(freq, expected, strict=True):
        if e == 0.0:
            assert f == 0.0, (freq, expected)
        else:
            assert abs(f - e) < 0.035, (freq, expected)


def test_temperature_flattens_the_distribution():
    # At temperature 2, p_i is proportional to sqrt(PROBS[i]).
    out = sample(fixed_logits(DRAWS), [row(SamplingParams(temperature=2.0)) for _ in range(DRAWS)])
    root = [math.sqrt(p) for p in PROBS]
    expected = [r / sum(root) for r in root]
    for f, e in zip(frequencies(out.token_ids, 4), expected, strict=True):
        assert abs(f - e) < 0.035


@pytest.mark.parametrize("device", DEVICES)
def test_truncation_only_touches_the_rows_that_ask(device):
    rows = [row(SamplingParams(top_k=1)) if i % 2 else row() for i in range(DRAWS)]
    out = sample(fixed_logits(DRAWS, device), rows)
    assert torch.all(out.token_ids[1::2] == 0)
    freq = frequencies(out.token_ids[0::2], 4)
    assert all(abs(f - e) < 0.05 for f, e in zip(freq, PROBS, strict=True)), freq


TOP2 = [0.625, 0.375, 0.0, 0.0]
TOP3 = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]


@pytest.mark.parametrize(
    "groups",
    [
        # Every top-p row has a top-k: the nucleus is searched among the top-k tokens only.
        [
            (SamplingParams(top_k=3, top_p=0.7), TOP2),
            (SamplingParams(), PROBS),
            (SamplingParams(top_k=3), TOP3),
        ],
        # A top-p row without top-k: the whole vocabulary is sorted.
        [
            (SamplingParams(top_k=3, top_p=0.7), TOP2),
            (SamplingParams(top_p=0.85), TOP3),
            (SamplingParams(), PROBS),
            (SamplingParams(top_k=2), TOP2),
        ],
    ],
    ids=["within-top-k", "full-sort"],
)
def test_mixed_truncation_gives_each_row_its_own(groups):
    per_group = 2000  # 4 sigma of a frequency near 0.5 is about 0.045
    rows = [row(params) for _ in range(per_group) for params, _ in groups]
    out = sample(fixed_logits(len(rows)), rows)
    for g, (_, expected) in enumerate(groups):
        freq = frequencies(out.token_ids[g :: len(groups)], 4)
        for f, e in zip(freq, expected, strict=True):
            assert (f == 0.0) if e == 0.0 else abs(f - e) < 0.05, (g, freq, expected)


def test_top_k_larger_than_vocab_is_no_restriction():
    out = sample(fixed_logits(DRAWS), [row(SamplingParams(top_k=1000)) for _ in range(DRAWS)])
    assert frequencies(out.token_ids, 4)[3] > 0.0


# --- penalties and min_tokens ---------------------------------------------------------------------

HANDMADE = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_shift_logits_by_the_formulas(device):
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    rows = [row(params, prompt=[0, 1], output=[2, 2, 3]), row()]
    logits = torch.tensor([HANDMADE, HANDMADE], device=device)
    apply_penalties(logits, SamplingBatch.build(rows, 6, device))
    expected = [
        2.0 / 2,  # in prompt, positive: divided
        -1.0 * 2,  # in prompt, negative: multiplied
        0.5 / 2 - 0.5 * 2 - 0.25,  # twice in output
        -3.0 * 2 - 0.5 * 1 - 0.25,  # once in output
        1.0,
        0.0,
    ]
    torch.testing.assert_close(logits[0].cpu(), torch.tensor(expected), rtol=0, atol=1e-6)
    assert logits[1].tolist() == HANDMADE, "a row without penalties must be untouched"


def test_frequency_and_presence_ignore_the_prompt():
    params = SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)
    logits = torch.tensor([HANDMADE])
    apply_penalties(logits, SamplingBatch.build([row(params, prompt=[0, 4], output=[5])], 6, "cpu"))
    assert logits[0].tolist() == HANDMADE[:5] + [-2.0]


def test_negative_penalties_encourage_repetition():
    params = SamplingParams(frequency_penalty=-2.0, temperature=0.0)
    out = sample(torch.tensor([HANDMADE]), [row(params, output=[4])])
    assert out.token_ids.tolist() == [4]  # 1.0 + 2.0 beats 2.0


def test_penalties_change_the_greedy_choice():
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    out = sample(torch.tensor([HANDMADE]), [row(params, prompt=[0])])
    assert out.token_ids.tolist() == [4]  # 2.0 / 4 = 0.5 < 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_blocks_eos_and_stop_token_ids(device):
    eos, stop_id = 3, 1
    logits = torch.tensor([[0.0, 9.0, 1.0, 10.0, 2.0]] * 3, device=device)
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id])
    rows = [row(params, output=[2], eos=eos), row(params, output=[2, 2, 2], eos=eos), row(params, eos=eos)]
    out = sample(logits, rows)
    assert out.token_ids.tolist() == [4, eos, 4]


def test_min_tokens_blocks_every_eos_id():
    params = SamplingParams(temperature=0.0, min_tokens=2)
    logits = torch.tensor([[0.0, 9.0, 1.0, 10.0, 2.0]])
    assert sample(logits, [row(params, eos=[1, 3])]).token_ids.tolist() == [4]


def test_min_tokens_with_ignore_eos_leaves_eos_alone():
    # vLLM: with ignore_eos, EOS is not a stop token, so min_tokens has nothing to block there.
    params = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=[1])
    logits = torch.tensor([[0.0, 9.0, 1.0, 10.0, 2.0]])
    batch = SamplingBatch.build([row(params, eos=3)], 5, "cpu")
    masked = apply_min_tokens(logits.clone(), batch)
    assert masked[0].tolist() == [0.0, float("-inf"), 1.0, 10.0, 2.0]


# --- logprobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax_with_sorted_top_k(device):
    logits = torch.randn(4, 64, device=device)
    raw = torch.log_softmax(logits, dim=-1)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=2)),
        row(SamplingParams(temperature=0.7, logprobs=5, repetition_penalty=1.5), prompt=[1, 2, 3]),
        row(SamplingParams(temperature=1.3, top_k=4, frequency_penalty=1.0), output=[7]),  # asks for none
        row(SamplingParams(logprobs=0, top_p=0.5)),
    ]
    out = sample(logits, rows)
    assert out.logprobs.shape == (4,) and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_token_ids.shape == out.top_logprobs.shape == (4, 5)
    top = raw.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs, top.values)
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])


def test_logprobs_zero_returns_only_the_sampled_token():
    out = sample(torch.randn(2, 10), [row(SamplingParams(logprobs=0)), row()])
    assert out.logprobs is not None and out.top_token_ids is None and out.top_logprobs is None


def test_half_precision_logits_are_accepted():
    logits = torch.randn(3, 20).to(torch.bfloat16)
    out = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=1)) for _ in range(3)])
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.top_logprobs.dtype == torch.float32


def test_logits_shape_must_match_the_batch():
    batch = SamplingBatch.build([row()], 10, "cpu")
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.randn(2, 10), batch)


# --- SamplingParams -------------------------------------------------------------------------------


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (16, 1.0, 1.0, 0, 0.0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs, p.min_tokens) == ([], [], False, None, 0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.is_greedy
    assert SamplingParams(temperature=0.0).is_greedy and SamplingParams(temperature=5e-6).is_greedy


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    stops = ["a", "b"]
    p = SamplingParams(stop=stops)
    stops.append("c")
    assert p.stop == ["a", "b"], "params keep their own copy"


def test_limits_at_the_edge_are_accepted():
    SamplingParams(
        max_tokens=1, top_p=1.0, top_k=-1, min_p=1.0, seed=2**63 - 1, logprobs=20,
        stop=["x" * 256] * 16, stop_token_ids=list(range(256)), presence_penalty=-2, frequency_penalty=2,
        repetition_penalty=0.01, min_tokens=1,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", "42"),
        ("stop", ["x"] * 17),
        ("stop", ["x" * 257]),
        ("stop", [""]),
        ("stop", [1]),
        ("stop", 5),
        ("stop_token_ids", list(range(257))),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("ignore_eos", 1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", -2.5),
        ("logprobs", 21),
        ("logprobs", -1),
        ("min_tokens", -1),
        ("min_tokens", 17),  # over the default max_tokens
        ("include_stop_str_in_output", "yes"),
        ("skip_special_tokens", None),
    ],
)
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=f"^{field} must be") as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)


def test_error_message_is_actionable():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature=float("nan"))
    assert str(info.value) == "temperature must be >= 0 and finite, got nan"
    with pytest.raises(InvalidRequestError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
