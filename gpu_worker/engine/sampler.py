"""Batched next-token sampling over a [N, V] logits tensor, with vLLM's semantics.

The engine builds a SamplingBatch once per step from the running requests; the Sampler then applies,
in order: repetition penalty (prompt + output tokens), frequency and presence penalties (output
tokens), the min_tokens mask, argmax for greedy rows, and temperature, top-k, top-p, min-p and an
exponential race for the others. Each stage is skipped when no row in the batch needs it, so an
all-greedy batch without penalties costs one argmax (plus a log_softmax if logprobs were asked for).

Logprobs are those of the raw model distribution (before penalties and temperature), as vLLM returns
by default.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_worker.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One request's input to a sampling step; the engine makes one per request and reuses it every step (the
    token lists are the request's own, growing in place)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # The request's own RNG, seeded from params.seed, on the logits' device; None for unseeded rows.
    generator: torch.Generator | None = None
    # The model's EOS id, or all of them (Llama 3 ends turns with several): min_tokens blocks each.
    eos_token_id: int | Sequence[int] | None = None
    # Output tokens sampled by a step in flight, not yet in output_token_ids (async scheduling); never with
    # penalties, which need the ids (the engine waits for that step first).
    num_pending: int = 0
    # Greedy with nothing to apply or report (no penalty, min_tokens or logprobs): a batch of only such rows is
    # one argmax, built without looking at anything else.
    plain: bool = field(init=False)

    def __post_init__(self):
        p = self.params
        self.plain = p.is_greedy and p.logprobs is None and p.min_tokens == 0 and not has_penalty(p)


@dataclass
class PenaltyTensors:
    """Penalty inputs for the rows that have any penalty, stacked as [P, ...] tensors."""

    # Row indices into the batch, or None when every row is penalized (saves a gather and a scatter).
    rows: torch.Tensor | None
    repetition: torch.Tensor  # [P, 1] float
    frequency: torch.Tensor  # [P, 1] float
    presence: torch.Tensor  # [P, 1] float
    # [P, V] bool, tokens seen in the prompt; None when no row has a repetition penalty.
    prompt_mask: torch.Tensor | None
    output_counts: torch.Tensor  # [P, V] float, occurrences of each token in the output so far
    do_frequency_presence: bool


@dataclass
class SamplingBatch:
    """Per-step tensors for a batch of rows, built once on the logits' device.

    A field is None when no row needs that stage; the flags are derived from random (non-greedy)
    rows only, since top-k/top-p/min-p/temperature do not change an argmax.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    greedy_mask: torch.Tensor | None  # [N] bool; None when all rows are greedy or all random
    temperatures: torch.Tensor | None  # [N, 1] float, 1.0 for greedy rows
    top_k: torch.Tensor | None  # [N] int64, vocab_size where off
    max_top_k: int  # largest top_k among rows that use it, known on the host so no device sync
    top_p: torch.Tensor | None  # [N] float, 1.0 where off
    # Every row using top-p also has a top-k: the nucleus is then found among the max_top_k best
    # tokens, with no sort of the whole vocabulary.
    top_p_within_top_k: bool
    min_p: torch.Tensor | None  # [N, 1] float, 0.0 where off
    penalties: PenaltyTensors | None
    # (row index, token id) pairs to mask to -inf while a row is below its min_tokens.
    min_tokens_rows: torch.Tensor | None
    min_tokens_ids: torch.Tensor | None
    # (row index, generator) for seeded random rows; they draw their own noise.
    seeded: list[tuple[int, torch.Generator]]
    needs_shared_noise: bool
    # Largest `logprobs` in the batch; None when no row asked for logprobs.
    max_num_logprobs: int | None

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> SamplingBatch:
        device = torch.device(device)
        n = len(rows)
        if all(r.plain for r in rows):
            return cls(num_rows=n, vocab_size=vocab_size, all_greedy=True, greedy_mask=None, temperatures=None,
                       top_k=None, max_top_k=0, top_p=None, top_p_within_top_k=True, min_p=None, penalties=None,
                       min_tokens_rows=None, min_tokens_ids=None, seeded=[], needs_shared_noise=False,
                       max_num_logprobs=None)
        greedy = [r.params.is_greedy for r in rows]
        random_rows = [(i, r) for i, r in enumerate(rows) if not greedy[i]]
        all_greedy = not random_rows

        def per_row(value, off):
            # Greedy rows get the neutral value: their token is the argmax, whatever these say.
            return [off if g else value(r.params) for g, r in zip(greedy, rows, strict=True)]

        temperatures = top_k = top_p = min_p = None
        max_top_k = 0
        if any(r.params.temperature != 1.0 for _, r in random_rows):
            temperatures = _tensor(per_row(lambda p: p.temperature, 1.0), torch.float32, device).unsqueeze(1)
        if any(0 < r.params.top_k < vocab_size for _, r in random_rows):
            ks = per_row(lambda p: min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size, vocab_size)
            top_k = _tensor(ks, torch.int64, device)
            max_top_k = max(k for k in ks if k < vocab_size)
        if any(r.params.top_p < 1.0 for _, r in random_rows):
            top_p = _tensor(per_row(lambda p: p.top_p, 1.0), torch.float32, device)
        if any(r.params.min_p > 0.0 for _, r in random_rows):
            min_p = _tensor(per_row(lambda p: p.min_p, 0.0), torch.float32, device).unsqueeze(1)

        mt_rows: list[int] = []
        mt_ids: list[int] = []
        for i, r in enumerate(rows):
            if len(r.output_token_ids) + r.num_pending < r.params.min_tokens:
                blocked = set(r.params.stop_token_ids)
                # vLLM: EOS is a stop token only without ignore_eos, so only then does min_tokens block it.
                if r.eos_token_id is not None and not r.params.ignore_eos:
                    blocked.update([r.eos_token_id] if isinstance(r.eos_token_id, int) else r.eos_token_id)
                blocked = sorted(t for t in blocked if t < vocab_size)
                mt_rows.extend([i] * len(blocked))
                mt_ids.extend(blocked)

        requested = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        return cls(
            num_rows=n,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            greedy_mask=_tensor(greedy, torch.bool, device) if random_rows and len(random_rows) < n else None,
            temperatures=temperatures,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            top_p_within_top_k=all(
                0 < r.params.top_k < vocab_size for _, r in random_rows if r.params.top_p < 1.0
            ),
            min_p=min_p,
            penalties=_build_penalties(rows, vocab_size, device),
            min_tokens_rows=_tensor(mt_rows, torch.int64, device) if mt_rows else None,
            min_tokens_ids=_tensor(mt_ids, torch.int64, device) if mt_rows else None,
            seeded=[(i, r.generator) for i, r in random_rows if r.generator is not None],
            needs_shared_noise=any(r.generator is None for _, r in random_rows),
            max_num_logprobs=max(requested) if requested else None,
        )


@dataclass
class SamplerOutput:
    """The sampled tokens of one step, and their logprobs when any row asked for them."""

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] float32, raw logprob of the sampled token
    # [N, K] with K the largest `logprobs` in the batch, sorted best first; rows that asked for
    # fewer use the first ones. None when K is 0 or nobody asked.
    top_token_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


class Sampler:
    """Turns a step's logits into next tokens; stateless, so one instance serves every step."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.shape != (batch.num_rows, batch.vocab_size):
            expected = (batch.num_rows, batch.vocab_size)
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match the batch {expected}")
        # Raw logprobs first: every later stage edits the logits.
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)

        # A greedy batch with nothing to edit takes the argmax of the logits as they are: a float copy changes no
        # argmax and costs more than the argmax itself on a large vocabulary.
        if batch.penalties is not None or batch.min_tokens_rows is not None or not batch.all_greedy:
            # float() copies; clone() when already float: never edit the caller's tensor.
            logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
        apply_penalties(logits, batch)
        apply_min_tokens(logits, batch)

        if batch.all_greedy:
            token_ids = _argmax(logits)
        else:
            greedy_ids = _argmax(logits) if batch.greedy_mask is not None else None
            token_ids = _sample_random(logits, batch)
            if greedy_ids is not None:
                token_ids = torch.where(batch.greedy_mask, greedy_ids, token_ids)

        out = SamplerOutput(token_ids=token_ids, logprobs=None, top_token_ids=None, top_logprobs=None)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            k = min(batch.max_num_logprobs, batch.vocab_size)
            if k > 0:
                out.top_logprobs, out.top_token_ids = raw_logprobs.topk(k, dim=-1, sorted=True)
        return out


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum: a Triton kernel on CUDA (one program per row: ~5x faster than torch.argmax
    over a 128K vocabulary), torch elsewhere."""
    if logits.is_cuda and logits.stride(-1) == 1:
        from kernels.argmax import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def warm_greedy(logits: torch.Tensor) -> torch.Tensor:
    """The greedy pick over a step's logits, run once before serving: on CUDA it compiles the argmax kernels (one
    variant for every batch, kernels/argmax.py), which a first greedy step would compile inside it otherwise."""
    return _argmax(logits)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Apply repetition, frequency and presence penalties to `logits` in place (vLLM formulas).

    repetition: tokens in prompt or output get logit / r if positive, logit * r otherwise;
    then logit -= frequency * count_in_output + presence * (count_in_output > 0).
    """
    pen = batch.penalties
    if pen is None:
        return logits
    sub = logits if pen.rows is None else logits.index_select(0, pen.rows)
    seen_in_output = pen.output_counts > 0
    if pen.prompt_mask is not None:
        factor = torch.where(pen.prompt_mask | seen_in_output, pen.repetition, 1.0)
        sub = torch.where(sub > 0, sub / factor, sub * factor)
    if pen.do_frequency_presence:
        sub = sub - pen.frequency * pen.output_counts - pen.presence * seen_in_output
    if pen.rows is None:
        logits.copy_(sub)
    else:
        logits.index_copy_(0, pen.rows, sub)
    return logits


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask EOS and stop_token_ids to -inf, in place, for rows still below their min_tokens."""
    if batch.min_tokens_rows is not None:
        logits[batch.min_tokens_rows, batch.min_tokens_ids] = float("-inf")
    return logits


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then an exponential race; edits `logits` in place."""
    if batch.temperatures is not None:
        logits.div_(batch.temperatures)
    if batch.top_k is not None or batch.top_p is not None:
        logits = _apply_top_k_top_p(logits, batch)
    probs = torch.softmax(logits, dim=-1)
    if batch.min_p is not None:
        # min-p keeps tokens with prob >= min_p * the row's top prob; renormalized by the race below.
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p
        probs = probs.masked_fill(probs < threshold, 0.0)

    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race), without a cumsum or a
    # device sync. Seeded rows draw their own noise so their tokens do not depend on the batch.
    # Greedy rows' noise may stay uninitialized (when every random row is seeded): their token is
    # replaced by the argmax afterwards.
    noise = torch.empty_like(probs)
    if batch.needs_shared_noise:
        noise.exponential_()
    for row, generator in batch.seeded:
        noise[row].exponential_(generator=generator)
    # Exp(1) can round to 0; 0/0 would be NaN, which argmax prefers over every number.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask to -inf the logits outside each row's top-k, then outside its top-p nucleus.

    Top-k keeps every token tied with the k-th best. Top-p then keeps, among the survivors, the
    smallest set of best tokens whose probability mass is >= p: a token stays while the mass of the
    tokens ranked above it is < p, so the best token always stays.
    """
    top_k, top_p = batch.top_k, batch.top_p
    vocab = logits.shape[1]
    if top_k is not None and (top_p is None or batch.top_p_within_top_k):
        # Only the max_top_k best tokens can survive: work on those, never sort the vocabulary.
        values, order = logits.topk(batch.max_top_k, dim=-1)
        kth = values.gather(1, (top_k.clamp(max=batch.max_top_k) - 1).unsqueeze(1))
        k_off = (top_k >= vocab).unsqueeze(1)
        if top_p is None:
            kth = torch.where(k_off, float("-inf"), kth)
            return logits.masked_fill_(logits < kth, float("-inf"))
        values = values.masked_fill(values < kth, float("-inf"))
        values = _mask_outside_nucleus(values, top_p)
        kept = torch.full_like(logits, float("-inf")).scatter_(1, order, values)
        # Rows without top-k have no top-p either here (top_p_within_top_k): they keep everything.
        return torch.where(k_off, logits, kept)

    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    return logits.scatter_(1, order, _mask_outside_nucleus(sorted_logits, top_p))


def _mask_outside_nucleus(sorted_logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p over logits sorted best first: -inf where the mass ranked above a token is >= p."""
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    # Rows with top-p off are left exactly as they were (not even float noise at p = 1), so a seeded
    # row samples the same whether or not a neighbour turned top-p on.
    outside = (mass_above >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    return sorted_logits.masked_fill_(outside, float("-inf"))


def _build_penalties(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
) -> PenaltyTensors | None:
    penalized = [i for i, r in enumerate(rows) if has_penalty(r.params)]
    if not penalized:
        return None
    sel = [rows[i] for i in penalized]
    any_repetition = any(r.params.repetition_penalty != 1.0 for r in sel)

    # Counts come from a scatter_add over padded id tensors; the padding id is vocab_size, whose
    # column is dropped afterwards. Prompts are only needed for rows with a repetition penalty.
    output_counts = _token_counts([r.output_token_ids for r in sel], vocab_size, device)
    prompt_mask = None
    if any_repetition:
        prompts = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else [] for r in sel]
        prompt_mask = _token_counts(prompts, vocab_size, device) > 0

    def column(values: list[float]) -> torch.Tensor:
        return _tensor(values, torch.float32, device).unsqueeze(1)

    return PenaltyTensors(
        rows=None if len(penalized) == len(rows) else _tensor(penalized, torch.int64, device),
        repetition=column([r.params.repetition_penalty for r in sel]),
        frequency=column([r.params.frequency_penalty for r in sel]),
        presence=column([r.params.presence_penalty for r in sel]),
        prompt_mask=prompt_mask,
        output_counts=output_counts,
        do_frequency_presence=any(
            r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in sel
        ),
    )


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_counts(id_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(id_lists), vocab_size] float32 occurrence counts of each token id per list.

    One scatter_add over the flattened (row, id) positions of a [rows, vocab_size + 1] tensor: no
    padding to the longest list, and the ids are converted by numpy in C (about 20 ns an id), not by a
    Python loop per token.
    """
    width = vocab_size + 1
    counts = torch.zeros(len(id_lists), width, dtype=torch.float32, device=device)
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    total = int(lengths.sum())
    if total:
        ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=total)
        rows = np.repeat(np.arange(len(id_lists), dtype=np.int64), lengths)
        # Ids past the logits (a bad token id) land in the extra column, dropped below, instead of failing.
        positions = _to_device(torch.from_numpy(rows * width + np.minimum(ids, vocab_size)), device)
        counts.view(-1).scatter_add_(0, positions, torch.ones(total, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor from Python values on `device`."""
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _to_device(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    # On CUDA through pinned memory, so the copy is asynchronous and the host does not wait for it.
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)
