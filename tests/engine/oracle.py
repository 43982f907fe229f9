"""The correctness oracle: transformers + PEFT on the same checkpoint and adapters, one prompt at a time."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=16)
def _model(model_dir: str, adapter_dir: str | None):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


@torch.inference_mode()
def greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int):
    """(generated token ids, per-step log_softmax rows [steps, vocab]) from transformers' greedy generate."""
    model = _model(str(model_dir), None if adapter_dir is None else str(adapter_dir))
    ids = torch.tensor([prompt_ids])
    # An explicit mask: generate() would otherwise mask every prompt token equal to pad_token_id.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.logits])
    return tokens, logprobs
