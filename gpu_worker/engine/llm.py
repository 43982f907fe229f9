"""LLM: offline batch inference over the engine, as vLLM users know it.

    llm = LLM(model="path/to/model", enable_lora=True, max_loras=2, max_lora_rank=16)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32), lora_request=LoRARequest("sql", 1, path))
    outs = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from .config import EngineArgs
from .llm_engine import LLMEngine
from .lora_request import LoRARequest
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs):
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in the prompts' order. `sampling_params` and `lora_request` are one for
        all prompts or a list with one per prompt (None in the list: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        # Only the finished outputs are returned: the engine builds no others (the caller's params are not changed).
        params = [dataclasses.replace(p, output_kind="final_only") for p in
                  _per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")]
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        order = {}
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = f"offline-{next(self._ids)}"
                order[rid] = len(order)
                self.engine.add_request(rid, prompt, p, lora_request=lora)
        except Exception:
            self.engine.abort_request(list(order))
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[rid] for rid in sorted(order, key=order.get)]


    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        continue_final_message: bool = False,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One conversation ([{"role", "content"}, ...]) or a list of them, rendered with the model's chat
        template (as the worker renders /v1/chat/completions), then generated as `generate` does."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = self.engine.tokenizer.render_chat(list(conversation), continue_final_message)
            prompts.append({"prompt": text, "prompt_token_ids": self.engine.tokenizer.encode_rendered(text)})
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
