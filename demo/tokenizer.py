"""A real, tiny byte-level BPE tokenizer trained offline from a built-in corpus.

Why byte-level BPE: the ByteLevel pre-tokenizer maps every byte to a symbol of the initial alphabet,
so *any* string (unicode, emoji, control characters) encodes without ``<unk>`` and decodes back
exactly.  A genuine merges table means multi-byte characters are routinely split across tokens,
which exercises the incremental/streaming detokenization paths a server must get right.  Training
on the fixed corpus below is deterministic and takes well under a second, so nothing is downloaded.

Special tokens: ``<s>`` (bos, id 0), ``</s>`` (eos, id 1) and ``<pad>`` (id 2).  A pad token distinct
from eos is kept because batching code needs one, and a separate id lets tests catch pad/eos mix-ups.
Encoding with special tokens prepends ``<s>`` like Llama does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A server loads many LoRA adapters on one base model,
and each request names the adapter it wants. The scheduler batches requests that use different
adapters together, so the kernels must gather the right low-rank weights for every token.
Tokens are streamed back to the client as soon as they are generated; the detokenizer must not
emit half of a multi-byte character. Caches evict the least recently used adapter when memory is
tight, and they reload it from the local disk, an S3 bucket or the Hugging Face Hub.
Hello, world! How are you today? I am fine, thank you. What time is it? It is ten past nine.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 3.14159 -7 1e-5 2026-01-01 12:30:45.
def forward(self, hidden_states, attention_mask=None):
    query = self.q_proj(hidden_states)
    key = self.k_proj(hidden_states)
    value = self.v_proj(hidden_states)
    return self.o_proj(attention(query, key, value, attention_mask))

for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")
    else:
        print("odd", i)

SELECT name, count(*) FROM users WHERE age > 21 GROUP BY name ORDER BY count(*) DESC LIMIT 10;
{"model": "tiny-llama", "adapter": "sql-lora", "prompt": "Hello", "max_tokens": 16, "stream": true}
Unicode: café, naïve, über, Straße, 日本語のテキスト, 中文文本, русский текст, emoji 🙂🚀✨.
"""


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 512,
    model_max_length: int = 512,
    extra_special_tokens: Sequence[str] = (),
) -> Path:
    """Train the byte-level BPE and write tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` as a fast tokenizer.
    ``vocab_size`` (specials included) must be at least 256 byte symbols + the specials; the rest are
    merges.  ``extra_special_tokens`` get ids right after ``<pad>`` (e.g. Qwen2's ``<|endoftext|>``,
    which transformers' Qwen2Tokenizer otherwise appends past the model's vocabulary).  Returns ``out_dir``.
    """
    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(specials)}, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    tok.save(str(out / "tokenizer.json"))

    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out
