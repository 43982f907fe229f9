"""LLMEngine: requests in, RequestOutputs out, one step at a time (vLLM's add_request / step API)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .block_manager import BlockManager
from .byte_level import ByteStream
from .config import EngineArgs
from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .errors import CapacityError, InvalidRequestError
from .kv_cache import allocate, num_blocks_for
from .lora.backends import make_backend
from .lora.manager import LoRAManager
from .lora_request import LoRARequest
from .model.config import ModelConfig
from .model.llama import LlamaModel
from .model_runner import ModelRunner, PendingTokens, StepResult
from .outputs import CompletionOutput, DeltaOutput, Logprob, RequestOutput
from .sampler import SamplerOutput, SamplingRow, has_penalty
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    """What the engine keeps per request beside the scheduler's Sequence."""

    prompt: str | None
    lora_request: LoRARequest | None
    detokenizer: ByteStream | IncrementalDetokenizer
    stops: StopStringMatcher
    generator: torch.Generator | None
    # The request's input to every sampling step (made once; its token lists are the sequence's own).
    row: SamplingRow | None = None
    # The text so far, in pieces: joined only for an output that carries it whole. (`text += piece` on an
    # attribute copies the whole string every token: O(length) a token, 18 us at 128k characters on the
    # 2-core dev VM, 1.1 ms a step for 64 such requests.)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float = 0.0
    # Emitted since the last output: drained into the next RequestOutput's delta fields (the text: pieces from
    # delta_from on, so a request that is output once, at its end, never grows a string a token at a time).
    delta_from: int = 0
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprob] = field(default_factory=list)

    def take_delta_text(self) -> str:
        """The text emitted since the last output; the next delta starts after it."""
        n, at = len(self.pieces), self.delta_from
        self.delta_from = n
        return self.pieces[at] if at == n - 1 else "".join(self.pieces[at:])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


@dataclass
class InFlightStep:
    """A launched step: its sampled tokens on the device, a host copy under way, and the event that ends it."""

    result: StepResult
    tokens: PendingTokens
    host: SamplerOutput
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, result: StepResult) -> InFlightStep:
        s = result.sampled
        rows = {c.seq: i for i, c in enumerate(result.completed)}
        if not s.token_ids.is_cuda:
            return cls(result, PendingTokens(s.token_ids, rows), s, None)
        # Copies queued behind the step (into pinned memory): waiting for them is waiting for this step only,
        # not for the step launched after it.
        host = SamplerOutput(*(None if t is None else t.to("cpu", non_blocking=True)
                               for t in (s.token_ids, s.logprobs, s.top_token_ids, s.top_logprobs)))
        done = torch.cuda.Event()
        done.record()
        return cls(result, PendingTokens(s.token_ids, rows), host, done)

    def wait(self) -> SamplerOutput:
        if self.done is not None:
            self.done.synchronize()
        return self.host


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.model_config = ModelConfig.from_dir(args.model)
        cfg = self.model_config
        self.served_model_name = args.served_model_name or Path(args.model).name
        self.tokenizer = Tokenizer(args.tokenizer or args.model)
        # The byte table built and checked now, not at the first request.
        log.debug("detokenizer: %s", "byte table" if self.tokenizer.byte_table is not None else "windowed decode")
        self.max_model_len = min(args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.eos_list = sorted(eos)
        self.primary_eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else (
            min(eos) if eos else None)

        t0 = time.perf_counter()
        self.model = LlamaModel(cfg, self.device, self.dtype, self.max_model_len, args.fused_elementwise)
        self.model.load(args.model)
        self.lora: LoRAManager | None = None
        if args.enable_lora:
            self.lora = LoRAManager(cfg, self.served_model_name, args.max_loras, args.max_cpu_loras,
                                    args.max_lora_rank, args.max_adapter_bytes, self.device, self.dtype)
            # Every projection's slots' A under its base weight: decode graphs shrink in the base GEMM.
            self.lora.buffers.attach_base(self.model.layers)
        num_blocks = args.num_kv_blocks or num_blocks_for(
            cfg, args.block_size, self.dtype, self.device, args.gpu_memory_utilization, args.cpu_kv_cache_bytes)
        # One block more than the block manager hands out: the scratch block padded graph rows write to.
        self.kv_caches = allocate(cfg, num_blocks + 1, args.block_size, self.device, self.dtype)
        self.blocks = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.lora.slots if self.lora else None,
                                   args.max_num_seqs, args.max_num_batched_tokens, loader=self.lora,
                                   max_model_len=self.max_model_len)
        backend = None
        if self.lora is not None:
            backend = make_backend(args.lora_backend, self.lora.buffers, self.device, args.max_num_batched_tokens,
                                   consumer_expands=self.model.fused)
            # Compiles the kernels' variants before serving; off CUDA (Triton's interpreter) nothing compiles, and
            # running them all took ~10 s a test engine.
            if hasattr(backend, "warmup") and self.device.type == "cuda":
                backend.warmup()
        self.runner = ModelRunner(self.model, self.kv_caches, args.block_size, backend, self.primary_eos,
                                  args.fused_prefill_attention)
        if self.device.type == "cuda":
            self.runner.warm_prompt_path(scratch_block=num_blocks)
        if self.device.type == "cuda" and not args.enforce_eager:
            self.runner.enable_graphs(min(args.max_num_seqs, 256), self.max_model_len, scratch_block=num_blocks,
                                      overlap_lora=args.overlap_lora)
            if args.piecewise_graphs:
                self.runner.enable_mixed_graphs(args.max_num_batched_tokens, scratch_block=num_blocks,
                                                overlap_lora=args.overlap_lora)
        # Stacked decode graphs cost more the more slots a batch spans: running adapters move down (scheduler.py).
        self.scheduler.compact_slots = bool(self.lora is not None and self.runner.graphs is not None
                                            and self.runner.graphs.prefixes)
        self._seqs: dict[str, Sequence] = {}
        # Async scheduling: the step launched last, whose tokens the next step() hands out while the device runs
        # the one after it; and how many live requests have penalties (their steps cannot overlap).
        self.async_scheduling = self.device.type == "cuda" if args.async_scheduling is None else args.async_scheduling
        self._in_flight: InFlightStep | None = None
        self._penalized = 0
        # Streamed (delta) outputs before the last as outputs.DeltaOutput tuples, not RequestOutputs: set by the
        # engine process, which sends them as they are (gpu_worker/engine_core.py).
        self.wire_deltas = False
        log.info("engine ready in %.1fs: %s on %s (%s), %d KV blocks of %d tokens, LoRA %s",
                 time.perf_counter() - t0, self.served_model_name, self.device, self.dtype, num_blocks,
                 args.block_size, f"on ({args.max_loras} slots, rank <= {args.max_lora_rank})" if self.lora else "off")

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises InvalidRequestError, AdapterError or CapacityError, leaving nothing held."""
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        text, token_ids = self._prompt(prompt)
        if not token_ids or text == "":
            raise InvalidRequestError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(token_ids)} tokens; this model takes at most "
                                      f"{self.max_model_len - 1} (max_model_len {self.max_model_len})")
        bad = [t for t in token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids out of the vocabulary [0, {self.model_config.vocab_size}): {bad[:5]}")
        if self.blocks.blocks_needed(len(token_ids) + 1) > self.blocks.num_blocks:
            raise CapacityError(f"the prompt needs more KV cache ({len(token_ids)} tokens) than this worker has")
        if len(self.scheduler.waiting) >= self.args.max_waiting_requests:
            raise CapacityError(f"the queue is full ({self.args.max_waiting_requests} requests waiting)")
        adapter_key = None
        if lora_request is not None:
            if self.lora is None:
                raise InvalidRequestError("this engine was started without enable_lora; adapters cannot be used")
            adapter_key = self.lora.resolve(lora_request)
            self.lora.pin(adapter_key)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        seq = Sequence(request_id, token_ids, params, adapter_key, arrival_time or time.monotonic())
        seq.state = RequestState(
            prompt=text,
            lora_request=lora_request,
            detokenizer=self.tokenizer.detokenizer(token_ids, params.skip_special_tokens),
            stops=StopStringMatcher(params.stop, params.include_stop_str_in_output),
            generator=generator,
            logprobs=[] if params.logprobs is not None else None,
        )
        seq.state.row = SamplingRow(params, seq.prompt_token_ids, seq.output_token_ids, generator, self.eos_list)
        self._seqs[request_id] = seq
        self._penalized += has_penalty(params)
        self.scheduler.add(seq)

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            return self._prompt(prompt.get("prompt", ""))
        if isinstance(prompt, (list, tuple)):
            return None, [int(t) for t in prompt]
        raise InvalidRequestError(f"a prompt is text, token ids or a dict, not {type(prompt).__name__}")

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Stop requests now, freeing their KV blocks and adapter slots. Unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outputs = []
        for rid in ids:
            seq = self._seqs.get(rid)
            if seq is None:
                continue
            seq.finish_reason = "abort"
            outputs.append(self._finish(seq))
        return outputs

    def has_unfinished_requests(self) -> bool:
        # A request whose token is still in flight is still running in the scheduler: it ends at hand-out. (A
        # step in flight whose rows all belong to ended requests has nothing left to hand out.)
        return self.scheduler.has_unfinished()

    def step_in_flight(self) -> bool:
        """Whether a launched step's tokens are still to be handed out (async scheduling): the next step()
        makes progress even if it returns nothing new now."""
        return self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._seqs)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput | DeltaOutput]:
        """Run one batch; returns an output for every request that produced tokens or finished (with
        `wire_deltas`, a streamed one before its last as an outputs.DeltaOutput tuple).

        With async scheduling the batch is launched, then the previous step's tokens are handed out while the
        device runs it: the host's work (scheduling, detokenizing, stop checks) hides behind the device's, and
        the outputs of a step come back one step() later. Sequences whose last token is still on the device
        are scheduled with it (it is copied on the device); one that stops on that token wastes one row, and
        its result is dropped. Batches with penalties (which need every token id on the host) do not overlap.
        """
        outputs: list[RequestOutput | DeltaOutput] = []
        pending, self._in_flight = self._in_flight, None
        launched = None
        try:
            if pending is not None and (self._penalized or not self.async_scheduling):
                outputs += self._hand_out(pending)
                pending = None
            sched = self.scheduler.schedule()
            launched = self._launch(sched, pending) if sched.chunks else None
            if self.lora is not None:
                self.lora.issue_loads()  # the cold copies this step started, behind its own inputs
            if pending is not None:
                outputs += self._hand_out(pending)
        except BaseException:
            # Tokens that will never be handed out: their sequences step back one token and compute it again.
            for step in (pending, launched):
                if step is not None:
                    for c in step.result.completed:
                        c.seq.pending = 0
                        c.seq.num_computed_tokens = min(c.seq.num_computed_tokens, c.seq.num_known_tokens - 1)
            raise
        if launched is not None:
            if self.async_scheduling and not self._penalized:
                self._in_flight = launched
            else:
                outputs += self._hand_out(launched)
        return outputs

    def _launch(self, sched, pending: InFlightStep | None) -> InFlightStep | None:
        rows = {}
        for c in sched.chunks:
            row = rows[c.seq] = c.seq.state.row
            row.num_pending = c.seq.pending
        result = self.runner.run(sched.chunks, rows, pending.tokens if pending is not None else None)
        for c in sched.chunks:
            self.scheduler.computed(c.seq, c.start + c.num_tokens)
        if result.sampled is None:
            return None
        for c in result.completed:
            c.seq.pending += 1
        return InFlightStep.start(result)

    def _hand_out(self, step: InFlightStep) -> list[RequestOutput | DeltaOutput]:
        """Wait for a launched step's tokens and append them to their requests."""
        s = step.wait()
        token_ids = s.token_ids.tolist()
        lps = s.logprobs.tolist() if s.logprobs is not None else None
        top_ids = s.top_token_ids.tolist() if s.top_token_ids is not None else None
        top_lps = s.top_logprobs.tolist() if s.top_logprobs is not None else None
        outputs = []
        for row, c in enumerate(step.result.completed):
            seq = c.seq
            seq.pending -= 1
            if seq.is_finished:
                continue  # stopped (or aborted) on an earlier token while this step ran: a wasted row
            lp = None
            if seq.params.logprobs is not None and lps is not None:
                k = seq.params.logprobs
                lp = Logprob(token_ids[row], lps[row], list(zip(top_ids[row][:k], top_lps[row][:k])) if k else [])
            self._append(seq, token_ids[row], lp)
            if seq.finish_reason:
                outputs.append(self._finish(seq))
            elif seq.params.output_kind != "final_only":
                outputs.append(self._output(seq))
        return outputs

    def _append(self, seq: Sequence, token: int, lp: Logprob | None) -> None:
        st: RequestState = seq.state
        params = seq.params
        seq.output_token_ids.append(token)
        st.delta_token_ids.append(token)
        if lp is not None:
            st.logprobs.append(lp)
            st.delta_logprobs.append(lp)
            st.cumulative_logprob += lp.logprob
        n_out = len(seq.output_token_ids)
        may_stop = n_out >= params.min_tokens
        if may_stop and not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif may_stop and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            emit, matched = st.stops.feed(st.detokenizer.append(token), can_stop=may_stop)
            if emit:
                st.pieces.append(emit)
            if matched is not None:
                seq.finish_reason, seq.stop_reason = "stop", matched
        if seq.finish_reason is None and (n_out >= params.max_tokens or seq.num_known_tokens >= self.max_model_len):
            seq.finish_reason = "length"

    def _output(self, seq: Sequence) -> RequestOutput | DeltaOutput:
        st: RequestState = seq.state
        whole = seq.finish_reason is not None or seq.params.output_kind == "cumulative"
        if self.wire_deltas and not whole:
            out = (seq.request_id, st.take_delta_text(), st.delta_token_ids, st.delta_logprobs)
            st.delta_token_ids, st.delta_logprobs = [], []
            return out
        completion = CompletionOutput(
            index=0,
            text="".join(st.pieces) if whole else "",
            token_ids=list(seq.output_token_ids) if whole else [],
            cumulative_logprob=st.cumulative_logprob if st.logprobs is not None else None,
            logprobs=(list(st.logprobs) if whole else []) if st.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            delta_text=st.take_delta_text(),
            delta_token_ids=st.delta_token_ids,
            delta_logprobs=st.delta_logprobs,
        )
        st.delta_token_ids, st.delta_logprobs = [], []
        return RequestOutput(seq.request_id, st.prompt, seq.prompt_token_ids, [completion],
                             finished=seq.finish_reason is not None, lora_request=st.lora_request,
                             adapter_key=seq.adapter_key)

    def _finish(self, seq: Sequence) -> RequestOutput:
        st: RequestState = seq.state
        if seq.finish_reason != "stop" or not isinstance(seq.stop_reason, str):
            rest = st.stops.flush()
            st.pieces.append(rest)
        self.scheduler.finish(seq)
        self._penalized -= has_penalty(seq.params)
        if seq.adapter_key is not None:
            self.lora.unpin(seq.adapter_key)
        del self._seqs[seq.request_id]
        return self._output(seq)

    # -- introspection ----------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_free": self.blocks.num_free,
            "kv_block_size": self.blocks.block_size,
            "prefix_cache_queried_tokens": self.blocks.prefix_queried_tokens,
            "prefix_cache_hit_tokens": self.blocks.prefix_hit_tokens,
            "adapters": self.lora.residency() if self.lora else [],
            "lora_slots_free": self.lora.slots.num_free if self.lora else 0,
        }
