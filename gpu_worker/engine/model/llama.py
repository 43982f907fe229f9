"""The Llama-family forward pass (Llama, Mistral, Qwen2) over a flat batch of tokens from many sequences.

q/k/v and gate/up are fused into one matrix each, so a layer runs four projections; LoRA, when the batch
uses any adapter, is added to each projection's output by the LoRA backend (`lora.project`): in place, or
returned as a delta that the elementwise op reading the projection adds (layer_ops.LoRADelta), or still to
expand, which that op does too (kernels/consumer_expand.PendingExpand).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, paged_attention
from .config import ModelConfig, UnsupportedModelError
from .layer_ops import FusedOps, LoRADelta, TorchOps
from .rope import RotaryEmbedding
from .weights import iter_tensors


class LoRAHook(Protocol):
    def layer_prefetch(self, layer: int, norm: str):
        """What the layer's norm ("input", "post") should ask into L2 on the way (kernels/l2_prefetch.Blocks), or
        None."""

    def project(self, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, tuple | None]:
        """F.linear(x, weight, bias) with the adapters' part for projection `group` of `layer`: added in place,
        (out, None); or as (out, (delta, slots)) for the next elementwise op to add; or (out, PendingExpand)
        for it to expand and add."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_size + 2 kv_size, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, q_size]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int,
                 fused_elementwise: bool | None = None):
        self.cfg = cfg
        # The layers' RMSNorm + residual, RoPE + cache write and SiLU-and-multiply: fused Triton kernels or torch
        # (None: fused on CUDA).
        fused = self.fused = device.type == "cuda" if fused_elementwise is None else fused_elementwise
        self.ops = FusedOps if fused else TorchOps
        self.device = device
        self.dtype = dtype
        self.rope = RotaryEmbedding(cfg, max_positions, device, dtype)
        self.scale = cfg.head_dim**-0.5
        self.embed: torch.Tensor | None = None
        self.final_norm: torch.Tensor | None = None
        self.lm_head: torch.Tensor | None = None
        self.layers: list[LayerWeights] = []

    def load(self, model_dir: str | Path) -> None:
        cfg = self.cfg
        raw: dict[str, torch.Tensor] = {}
        for name, tensor in iter_tensors(model_dir):
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raw[name] = tensor

        def take(name: str) -> torch.Tensor:
            if name not in raw:
                raise UnsupportedModelError(f"checkpoint lacks tensor {name}")
            return raw.pop(name).to(device=self.device, dtype=self.dtype)

        self.embed = take("model.embed_tokens.weight")
        self.final_norm = take("model.norm.weight")
        if "lm_head.weight" in raw:
            self.lm_head = take("lm_head.weight")
        elif cfg.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            raise UnsupportedModelError("checkpoint lacks lm_head.weight and does not tie embeddings")
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([take(p + f"self_attn.{m}_proj.weight") for m in "qkv"])
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([take(p + f"self_attn.{m}_proj.bias") for m in "qkv"])
            self.layers.append(
                LayerWeights(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=qkv,
                    qkv_bias=bias,
                    o=take(p + "self_attn.o_proj.weight"),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                    down=take(p + "mlp.down_proj.weight"),
                )
            )
        leftover = list(raw)
        if leftover:
            raise UnsupportedModelError(f"checkpoint has tensors this architecture does not use: {leftover[:5]}")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logits_indices: torch.Tensor,
        lora: LoRAHook | None = None,
    ) -> torch.Tensor:
        """Tokens [T] -> logits [N, vocab] (the model's dtype) for the rows in logits_indices."""
        h = self.embed_tokens(input_ids)
        # Each sublayer's output is added to h by the next norm (one fused step with it on the GPU); so is the
        # adapters' part of each projection when the LoRA backend hands it back as a delta.
        residual, delta = None, None
        for i in range(len(self.layers)):
            q, h = self.before_attention(i, h, residual, delta, positions, meta, kv_caches, lora)
            k_cache, v_cache = kv_caches[i]
            attn = paged_attention(q, k_cache, v_cache, meta, self.scale)
            h, residual, delta = self.after_attention(i, attn, h, lora)
        if delta is not None:  # the last layer's adapters' part is added over every row, then the rows picked
            x = self.final_norm_rows(h, residual, delta)[logits_indices]
        else:
            x, _ = self.ops.add_norm(h[logits_indices], None if residual is None else residual[logits_indices],
                                     self.final_norm, self.cfg.rms_norm_eps)
        return self.logits(x)

    # The forward in pieces, cut at attention (gpu_worker/engine/mixed_graphs.py captures the pieces between two
    # attentions as CUDA graphs and runs attention, whose inputs change shape with every step, eagerly).

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed)

    def before_attention(self, i: int, h: torch.Tensor, residual: torch.Tensor | None, delta, positions: torch.Tensor,
                         meta, kv_caches, lora: LoRAHook | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i up to attention: the previous sublayer's output (residual, its adapters' part delta) added to h,
        the norm, q / k / v, RoPE, k and v into the cache at meta.slot_mapping. Returns (q [T, H, D], h)."""
        w = self.layers[i]
        prefetch = lora.layer_prefetch(i, "input") if lora is not None else None
        x, h = self.ops.add_norm(h, residual, w.input_norm, self.cfg.rms_norm_eps, delta, prefetch)
        qkv, delta = self._project(lora, i, "qkv", x, w.qkv, w.qkv_bias)
        q, k, v = self._heads(qkv)
        if isinstance(delta, LoRADelta):
            delta = LoRADelta(self._heads(delta[0]), delta[1])
        k_cache, v_cache = kv_caches[i]
        return self.ops.rope_and_cache(q, k, v, positions, self.rope, k_cache, v_cache, meta, delta), h

    def after_attention(self, i: int, attn: torch.Tensor, h: torch.Tensor, lora: LoRAHook | None):
        """Layer i from attention's output [T, H, D] on: o, the norm, the MLP. Returns (h, the MLP's output, its
        adapters' part or None): the next layer's norm (or final_norm_rows) adds them to h."""
        w, eps = self.layers[i], self.cfg.rms_norm_eps
        o, delta = self._project(lora, i, "o", attn.reshape(-1, self.cfg.q_size), w.o)
        prefetch = lora.layer_prefetch(i, "post") if lora is not None else None
        x, h = self.ops.add_norm(h, o, w.post_norm, eps, delta, prefetch)
        gate_up, delta = self._project(lora, i, "gate_up", x, w.gate_up)
        act = self.ops.silu_mul(gate_up, delta)
        residual, delta = self._project(lora, i, "down", act, w.down)
        return h, residual, delta

    def final_norm_rows(self, h: torch.Tensor, residual: torch.Tensor | None, delta) -> torch.Tensor:
        """The last layer's output added to h and the final norm, over every row."""
        return self.ops.add_norm(h, residual, self.final_norm, self.cfg.rms_norm_eps, delta)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # Logits in the model's dtype: the sampler widens them where it must (log_softmax in float32, a float copy
        # before penalties or temperature); a greedy argmax reads them as they are (a float copy of [64, 128K]
        # cost 22 us a decode step on an H200).
        return F.linear(x, self.lm_head)

    @staticmethod
    def _project(lora: LoRAHook | None, layer: int, group: str, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, LoRADelta | None]:
        if lora is None:
            return F.linear(x, weight, bias), None
        out, delta = lora.project(layer, group, x, weight, bias)
        # A plain (values, slots) pair is a delta; a PendingExpand (a NamedTuple, not a plain tuple) goes on as is.
        return out, LoRADelta(*delta) if type(delta) is tuple else delta

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, q + 2 kv] -> q [T, H, D], k and v [T, KVH, D] (views)."""
        cfg = self.cfg
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        return (q.view(-1, cfg.num_heads, cfg.head_dim), k.view(-1, cfg.num_kv_heads, cfg.head_dim),
                v.view(-1, cfg.num_kv_heads, cfg.head_dim))
