"""The model's tokenizer, from tokenizer.json through the `tokenizers` library (no transformers at run time)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .byte_level import ByteStream, ByteTable
from .chat_template import ChatTemplate
from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequestError


class Tokenizer:
    def __init__(self, path: str | Path):
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{root} has no tokenizer.json (a fast tokenizer file is required)")
        self.hf = HFTokenizer.from_file(str(file))
        cfg_file = root / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token_id = self._token_id(self.config.get("bos_token"))
        self.eos_token_id = self._token_id(self.config.get("eos_token"))
        # Llama checkpoints say "add_bos_token": true; if the tokenizer.json post-processor does not add it,
        # prepend it here so prompts match what transformers' AutoTokenizer feeds the model.
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.chat_template = ChatTemplate.from_dir(root, self.config)

    @functools.cached_property
    def byte_table(self) -> ByteTable | None:
        """Byte-level BPE streams its text from a table of each token's bytes (byte_level.py); None otherwise.
        Built on first use (~1 s for a 128K vocabulary, checked against the decode): the engine asks at start; a
        server that only tokenizes never does."""
        return ByteTable.build(self.hf)

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self.hf.token_to_id(token) if token else None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}")
        ids = self.hf.encode(text, add_special_tokens=True).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_token_ids: list[int], skip_special_tokens: bool
                    ) -> ByteStream | IncrementalDetokenizer:
        """What streams one request's output text: append(token) -> the text it completes; flush(); text."""
        if self.byte_table is not None:
            return ByteStream(self.byte_table, skip_special_tokens)
        return IncrementalDetokenizer(self.hf, prompt_token_ids, skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], continue_final_message: bool = False) -> str:
        """The conversation as the model's chat template writes it; InvalidRequestError when the model has no
        template or the template refuses the conversation."""
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template (tokenizer_config.json has no chat_template "
                                      "and there is no chat_template.jinja): send a text prompt instead")
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise InvalidRequestError("continue_final_message needs an assistant message last")
        text = self.chat_template.render(messages, add_generation_prompt=not continue_final_message)
        if continue_final_message:  # the template closed the last turn: cut back to the end of its text
            last = messages[-1]["content"]
            end = text.rfind(last)
            text = text[: end + len(last)] if last and end >= 0 else text
        return text

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat: the template wrote the special tokens itself, none are added."""
        return self.hf.encode(text, add_special_tokens=False).ids
