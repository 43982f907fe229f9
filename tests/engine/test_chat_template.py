"""The chat template as transformers renders it (the oracle: AutoTokenizer.apply_chat_template on the same
model directory), its forms (tokenizer_config.json string or named list, chat_template.jinja), its refusals
and its sandbox."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from gpu_worker.engine.chat_template import ChatTemplate
from gpu_worker.engine.errors import InvalidRequestError
from gpu_worker.engine.tokenizer import Tokenizer

CONVERSATION = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": "All users?"},
                {"role": "assistant", "content": "SELECT * FROM users;"}, {"role": "user", "content": "Only ids."}]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_and_tokenizes_as_transformers_does(tiny_model_dir, add_generation_prompt):
    ours = Tokenizer(tiny_model_dir)
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.chat_template.render(CONVERSATION, add_generation_prompt) == text
    ids = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert ours.encode_rendered(ours.chat_template.render(CONVERSATION, add_generation_prompt)) == list(ids)
    if add_generation_prompt:
        assert ours.render_chat(CONVERSATION) == text


def test_continue_final_message_ends_inside_the_assistant_turn(tiny_model_dir):
    ours = Tokenizer(tiny_model_dir)
    partial = [*CONVERSATION[:2], {"role": "assistant", "content": "SELECT id"}]
    text = ours.render_chat(partial, continue_final_message=True)
    assert text.endswith("SELECT id") and text.startswith(ours.render_chat(CONVERSATION[:2])[:10])
    with pytest.raises(InvalidRequestError, match="assistant message last"):
        ours.render_chat(CONVERSATION, continue_final_message=True)


def test_template_forms_and_a_model_without_one(tiny_model_dir, tmp_path):
    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    source = cfg["chat_template"]
    named = ChatTemplate.from_dir(tmp_path, {**cfg, "chat_template": [{"name": "tool_use", "template": "x"},
                                                                      {"name": "default", "template": source}]})
    assert named.render(CONVERSATION, True) == ChatTemplate.from_dir(tmp_path, cfg).render(CONVERSATION, True)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert ChatTemplate.from_dir(tmp_path, {}).render(CONVERSATION[:2], True) == "[You write SQL.][All users?]"

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "chat_template"}))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(bare).render_chat(CONVERSATION)


def test_refusals_and_the_sandbox(tmp_path):
    strict = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                          "ok", {})
    with pytest.raises(InvalidRequestError, match="refused the messages: first must be user"):
        strict.render(CONVERSATION, True)
    assert strict.render(CONVERSATION[1:], True) == "ok"
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(InvalidRequestError, match="cannot render"):
        escape.render(CONVERSATION, True)


def test_llm_chat_is_generate_on_the_rendered_conversation(tiny_model_dir, tiny_adapters):
    from gpu_worker.engine import LLM, LoRARequest, SamplingParams

    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=64)
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    sql = LoRARequest("sql-lora", 1, str(tiny_adapters["sql-lora"]))
    chats = llm.chat([CONVERSATION, CONVERSATION[:2]], greedy, lora_request=[sql, None])
    plain = llm.generate([list(ids)], greedy, lora_request=sql)
    assert chats[0].prompt_token_ids == list(ids)
    assert chats[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert chats[1].prompt_token_ids != chats[0].prompt_token_ids and len(chats[1].outputs[0].token_ids) == 6
    assert llm.chat(CONVERSATION, greedy)[0].prompt_token_ids == list(ids)  # one conversation alone
