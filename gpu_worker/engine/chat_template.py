"""The model's chat template: a conversation -> the prompt text the model was trained on.

Read from tokenizer_config.json's "chat_template" (a string, or a list of named templates of which "default"
is used) or from chat_template.jinja beside it, and rendered as transformers' apply_chat_template renders it:
Jinja2 in a sandbox (a template is data from the model's author, not code we trust), trim_blocks and
lstrip_blocks, `raise_exception` for templates that refuse a conversation, the special tokens as variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import InvalidRequestError

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the model's template before tokenizing."""

    messages: tuple[dict[str, str], ...]
    continue_final_message: bool = False


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, indent=None, **kw: json.dumps(v, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def from_dir(cls, root: Path, config: dict) -> ChatTemplate | None:
        """The template a model directory declares, or None when it has none."""
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not source and (root / TEMPLATE_FILE).is_file():
            source = (root / TEMPLATE_FILE).read_text()
        if not isinstance(source, str) or not source:
            return None
        specials = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            specials[key] = token or ""
        return cls(source, specials)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except InvalidRequestError:
            raise
        except TemplateError as e:
            raise InvalidRequestError(f"the model's chat template cannot render these messages: {e}") from None


def _raise(message: str):
    raise InvalidRequestError(f"the model's chat template refused the messages: {message}")
