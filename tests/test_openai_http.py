"""The router's OpenAI-compatible HTTP front against the stack as `make run` starts it (tiny demo model): the
curl commands of vLLM's "Serving with API" and "Dynamic adapter loading" sections, unchanged; the official
`openai` client; errors in OpenAI's shape with the HTTP status matching the gRPC one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import openai
import pytest
from transformers import AutoTokenizer

from loraserve_client import Client
from tests.stack_process import TOKEN, running_stack

BASE = "demo-llama"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("openai") / "demo") as st:
        yield st


def curl(*args: str) -> tuple[int, str]:
    """curl as the docs run it; (HTTP status, body)."""
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def post(url: str, body: dict, *headers: str) -> tuple[int, str]:
    hs = [a for h in headers for a in ("-H", h)]
    return curl(url, "-H", "Content-Type: application/json", *hs, "-d", json.dumps(body))


def sse(body: str) -> list:
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_models_list_the_base_model_and_adapters_with_their_parent(stack):
    status, body = curl(f"{stack.http}/v1/models")
    assert status == 200
    listing = json.loads(body)
    cards = {m["id"]: m for m in listing["data"]}
    assert listing["object"] == "list" and cards[BASE]["parent"] is None and cards[BASE]["object"] == "model"
    assert cards["sql-lora"]["parent"] == BASE and cards["sql-lora"]["root"]


def test_the_docs_completion_request_and_its_stream(stack):
    request = {"model": "sql-lora", "prompt": "San Francisco is a", "max_tokens": 7, "temperature": 0}
    status, body = post(f"{stack.http}/v1/completions", request)
    assert status == 200, body
    done = json.loads(body)
    choice = done["choices"][0]
    assert done["object"] == "text_completion" and done["model"] == "sql-lora" and choice["index"] == 0
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert 1 <= done["usage"]["completion_tokens"] <= 7
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    # the same request through gRPC gives the same greedy text: one path, not two
    with Client(stack.address) as c:
        assert c.generate("San Francisco is a", model="sql-lora", max_tokens=7, temperature=0).text == choice["text"]

    status, body = post(f"{stack.http}/v1/completions",
                        {**request, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = sse(body)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == choice["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == done["usage"]
    assert all("usage" not in c for c in chunks[:-1]) and len({c["id"] for c in chunks}) == 1


CHAT = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": "All users?"}]


def test_chat_completions_render_the_models_template_on_the_worker(stack):
    request = {"model": "sql-lora", "messages": CHAT, "max_tokens": 6, "temperature": 0}
    status, body = post(f"{stack.http}/v1/chat/completions", request)
    assert status == 200, body
    done = json.loads(body)
    message = done["choices"][0]["message"]
    assert done["object"] == "chat.completion" and message["role"] == "assistant"
    # the oracle: transformers renders the same model directory's template; the same tokens through gRPC
    # give the same greedy text
    hf = AutoTokenizer.from_pretrained(stack.demo / "model")
    ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert done["usage"]["prompt_tokens"] == len(ids)
    with Client(stack.address) as c:
        assert c.generate(list(ids), model="sql-lora", max_tokens=6, temperature=0).text == message["content"]
        # the gRPC API takes the conversation itself (the worker renders it): the same answer
        assert c.generate(CHAT, model="sql-lora", max_tokens=6, temperature=0).text == message["content"]
    cli = subprocess.run([sys.executable, "-m", "loraserve_client", "--address", stack.address, "generate", "--chat",
                          "--system", CHAT[0]["content"], "--model", "sql-lora", "--max-tokens", "6",
                          "--temperature", "0", CHAT[1]["content"]], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout.rstrip("\n") == message["content"], cli.stderr

    status, body = post(f"{stack.http}/v1/chat/completions",
                        {**request, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse(body)
    assert status == 200 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == message["content"]
    assert chunks[-1]["usage"] == done["usage"]

    client = openai.OpenAI(base_url=f"{stack.http}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="sql-lora", messages=CHAT, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2)
    assert answer.choices[0].message.content == message["content"]
    assert len(answer.choices[0].logprobs.content) == answer.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in answer.choices[0].logprobs.content)
    streamed = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, temperature=0, stream=True)
    assert sum(1 for c in streamed if c.choices and c.choices[0].delta.content) >= 1


@pytest.mark.parametrize("body, words", [
    ({"model": "sql-lora", "messages": []}, "non-empty list"),
    ({"model": "sql-lora", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"model": "sql-lora", "messages": CHAT, "continue_final_message": True}, "assistant message last"),
    ({"model": "sql-lora", "messages": CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs"),
])
def test_bad_chat_requests_get_openai_errors(stack, body, words):
    status, text = post(f"{stack.http}/v1/chat/completions", body)
    assert status == 400 and words in json.loads(text)["error"]["message"], text


def test_dynamic_adapter_loading_needs_the_token_and_then_works(stack):
    url, source = stack.http, str(stack.demo / "adapters" / "chat-lora")
    load = {"lora_name": "sql_adapter", "lora_path": source}
    status, body = post(f"{url}/v1/load_lora_adapter", load)
    assert status == 401 and json.loads(body)["error"]["code"] == 401 and "Bearer" in body
    auth = f"Authorization: Bearer {TOKEN}"
    status, body = post(f"{url}/v1/load_lora_adapter", load, auth)
    assert status == 200 and body == "Success: LoRA adapter 'sql_adapter' added successfully."
    assert "sql_adapter" in {m["id"] for m in json.loads(curl(f"{url}/v1/models")[1])["data"]}
    ask = {"model": "sql_adapter", "prompt": "SELECT", "max_tokens": 3, "temperature": 0}
    assert post(f"{url}/v1/completions", ask)[0] == 200
    status, body = post(f"{url}/v1/load_lora_adapter", {**load, "load_inplace": True}, auth)
    assert status == 200, body
    status, body = post(f"{url}/v1/unload_lora_adapter", {"lora_name": "sql_adapter"}, auth)
    assert status == 200 and body == "Success: LoRA adapter 'sql_adapter' removed successfully."
    status, body = post(f"{url}/v1/completions", ask)
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"


def test_the_openai_client_works_unchanged(stack):
    client = openai.OpenAI(base_url=f"{stack.http}/v1", api_key="unused", max_retries=0)
    assert {"sql-lora", BASE} <= {m.id for m in client.models.list()}
    done = client.completions.create(model="sql-lora", prompt="Hello", max_tokens=5, temperature=0)
    assert done.usage.completion_tokens >= 1 and done.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model="sql-lora", prompt="Hello", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    with pytest.raises(openai.NotFoundError, match="ghost"):
        client.completions.create(model="ghost", prompt="Hello", max_tokens=2)
    several = client.completions.create(model="sql-lora", prompt=["Hello", "Bye"], max_tokens=2, n=2, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text  # greedy: a prompt's samples agree


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "hi"}, 400, "model is required"),
    ({"model": "sql-lora", "prompt": "hi", "temperature": "hot"}, 400, "temperature must be a number"),
    ({"model": "sql-lora", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "sql-lora", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "sql-lora", "prompt": ["a", 3]}, 400, "list of token ids"),
    ({"model": "sql-lora", "prompt": "hi", "n": 0}, 400, "n must be"),
    ({"model": "sql-lora", "prompt": ["a"] * 9, "n": 8}, 400, "at most 64"),
    ({"model": "sql-lora", "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream is true"),
    ({"model": "../etc/passwd", "prompt": "hi"}, 400, "name"),
    ({"model": "ghost", "prompt": "hi", "stream": True}, 404, "ghost"),
])
def test_bad_requests_get_openai_errors(stack, body, status, words):
    got, text = post(f"{stack.http}/v1/completions", body)
    error = json.loads(text)["error"]
    assert got == status and error["code"] == status and words in error["message"], text


def test_malformed_bodies_paths_health_and_metrics(stack):
    status, body = curl(f"{stack.http}/v1/completions", "-H", "Content-Type: application/json", "-d", "{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, body = curl(f"{stack.http}/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == 404
    assert curl(f"{stack.http}/health") == (200, "")
    post(f"{stack.http}/v1/completions", {"model": "sql-lora", "prompt": "hi", "max_tokens": 2})
    status, body = curl(f"{stack.http}/metrics")
    assert status == 200 and 'vllm:lora_requests_info{max_lora="2"' in body
    # vLLM's names, as its dashboards and the Gateway API Inference Extension read them
    for series in ('vllm:num_requests_waiting{model_name="demo-llama"}', 'vllm:gpu_cache_usage_perc{model_name=',
                   'vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="demo-llama"}',
                   'vllm:e2e_request_latency_seconds_count{model_name="demo-llama"}',
                   'vllm:prefix_cache_queries_total{model_name="demo-llama"}',
                   'vllm:prefix_cache_hits_total{model_name="demo-llama"}'):
        assert series in body, series
    generated = next(float(line.split()[-1]) for line in body.splitlines()
                     if line.startswith('vllm:generation_tokens_total{model_name="demo-llama"}'))
    assert generated >= 2
    assert 'loraserve_router_requests_total{code="OK",kind="adapter",rpc="Generate"}' in body
    with Client(stack.address) as c:  # the gRPC API is untouched by the HTTP front
        assert c.generate("hi", max_tokens=1).text is not None


def test_several_prompts_and_n_samples_in_one_request(stack):
    """vLLM's batch completions: a list of prompts, n samples each, one choice per (prompt, sample), prompt-major;
    seeded samples use seed + j (they differ, and repeat); usage counts each prompt once and every sample."""
    url = f"{stack.http}/v1/completions"
    body = {"model": "sql-lora", "prompt": ["SELECT", [5, 6, 7]], "max_tokens": 6, "n": 3, "temperature": 1.0,
            "seed": 11, "ignore_eos": True}
    status, text = post(url, body)
    assert status == 200, text
    done = json.loads(text)
    assert [c["index"] for c in done["choices"]] == list(range(6))
    texts = [c["text"] for c in done["choices"]]
    assert len(set(texts[:3])) > 1  # seeds 11, 12, 13: different samples of one prompt
    assert json.loads(post(url, body)[1])["choices"][2]["text"] == texts[2]  # and each repeats
    one = {**body, "prompt": "SELECT", "n": 1}
    assert json.loads(post(url, one)[1])["choices"][0]["text"] == texts[0]  # sample 0: the plain seeded request
    prompt_tokens = json.loads(post(url, one)[1])["usage"]["prompt_tokens"] + 3
    assert done["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 36,
                             "total_tokens": prompt_tokens + 36}

    # Streamed: every choice's chunks, each with its index, its finish reason once, then the usage chunk.
    status, text = post(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200, text
    chunks = sse(text)
    streamed = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == k)
                for k in range(6)]
    assert streamed == texts
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == list(range(6))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == done["usage"]

    # Chat: n samples of one conversation, the role in each choice's first delta.
    chat = {"model": "math-lora", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 4, "n": 2,
            "seed": 3, "temperature": 1.0, "stream": True}
    status, text = post(f"{stack.http}/v1/chat/completions", chat)
    assert status == 200, text
    chunks = sse(text)
    for k in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == k]
        assert mine[0]["delta"]["role"] == "assistant" and all("role" not in c["delta"] for c in mine[1:])


def test_a_client_leaving_a_several_choice_stream_frees_the_worker(stack):
    """Every choice's generation stops when the client goes mid-stream: the worker ends up with no request."""
    host, port = stack.http.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "sql-lora", "prompt": ["a", "b"], "n": 2, "max_tokens": 2000, "ignore_eos": True,
                       "stream": True})
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        got = b""
        while got.count(b"data: ") < 8:  # a few chunks of the choices, then leave
            got += sock.recv(65536)
    deadline, running = time.monotonic() + 20, None
    while time.monotonic() < deadline:  # the worker's status reaches the router with its next heartbeat
        metrics = curl(f"{stack.http}/metrics")[1]
        running = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith('vllm:num_requests_running{model_name="demo-llama"}'))
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0, "the choices' generations kept running after the client left"
