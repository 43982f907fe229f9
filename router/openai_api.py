"""OpenAI-compatible request and response shapes, as vLLM's server speaks them, mapped onto the gRPC API.

Pure functions, no I/O: a JSON body becomes the same GenerateRequest a gRPC client would send (so the
router and the worker check it exactly as they check gRPC requests: nothing is validated twice or
differently), and the router's deltas become completion objects or server-sent-event chunks. Several prompts
in one completions request and n > 1 become one GenerateRequest per choice (prompt-major: choice i * n + j is
prompt i's j-th sample; with a seed, sample j uses seed + j, as vLLM seeds its parallel samples), at most
MAX_CHOICES in all. What the API has and we cannot honour (best_of, echo, suffix, logit_bias) is refused with a
400 that says so, never silently ignored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loraserve.v1 import common_pb2, inference_pb2
from router import errors
from router.domain import Delta, ModelEntry

OWNED_BY = "loraserve"
# HTTP status for each gRPC status name (errors.RouterError.code), as vLLM's server answers.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499, "INTERNAL": 500,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error"}
_FINISH = {"length": "length", "stop": "stop", "abort": "abort", "error": "error"}
MAX_CHOICES = 64  # prompts x n in one request


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = _ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# -- requests -----------------------------------------------------------------------------------------

def completion_request(body: dict, request_id: str) -> tuple[list[inference_pb2.GenerateRequest], int, bool, bool]:
    """/v1/completions body (a JSON object) -> (a GenerateRequest per choice, n, stream, include_usage)."""
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    # One prompt (a string, or token ids), or a batch of them (a list of strings, or of token-id lists).
    batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
        else [prompt]
    prompts = []
    for p in batch:
        if isinstance(p, str):
            prompts.append(common_pb2.Prompt(text=p))
        elif isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p):
            prompts.append(common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=p)))
        else:
            raise bad_request("prompt must be a string, a list of token ids, or a list of either", "prompt")
    sampling = sampling_params(body, logprobs=_opt_int(body, "logprobs", 0, 21))
    stream, include_usage = _stream_flags(body)
    n = _n(body)
    return _choices(request_id, _model(body), prompts, sampling, n), n, stream, include_usage


def chat_request(body: dict, request_id: str) -> tuple[list[inference_pb2.GenerateRequest], int, bool, bool]:
    """/v1/chat/completions body (a JSON object) -> (a GenerateRequest per choice, n, stream, include_usage). The
    messages go to the worker, which renders them with the model's chat template."""
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    pb_messages = common_pb2.ChatMessages()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role and a content", "messages")
        pb_messages.messages.add(role=m["role"], content=_content(m.get("content"), i))
    cont = body.get("continue_final_message", False)
    if not isinstance(cont, bool) or body.get("add_generation_prompt", not cont) is cont:
        raise bad_request("continue_final_message must be true or false (and add_generation_prompt its opposite)",
                   "continue_final_message")
    pb_messages.continue_final_message = cont
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    top = _opt_int(body, "top_logprobs", 0, 21)
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise bad_request("logprobs must be true or false (top_logprobs says how many alternatives)", "logprobs")
    if top and not want:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    sampling = sampling_params(body, logprobs=(top or 0) if want else None, max_tokens_key=key)
    stream, include_usage = _stream_flags(body)
    n = _n(body)
    return (_choices(request_id, _model(body), [common_pb2.Prompt(messages=pb_messages)], sampling, n), n, stream,
            include_usage)


def _n(body: dict) -> int:
    n = body.get("n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n must be an integer in [1, {MAX_CHOICES}]", "n")
    return n


def _choices(request_id: str, model: str, prompts: list[common_pb2.Prompt], sampling: common_pb2.SamplingParams,
             n: int) -> list[inference_pb2.GenerateRequest]:
    """A GenerateRequest per choice, prompt-major; sample j of a seeded request uses seed + j. A client's request
    id names the first choice's request; the others get it with "-k" (when that fits, else the router's ids)."""
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={n} make {len(prompts) * n} choices; at most {MAX_CHOICES} "
                          "in one request", "n")
    out = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            k = i * n + j
            sp = sampling
            if j and sampling.HasField("seed"):
                sp = common_pb2.SamplingParams()
                sp.CopyFrom(sampling)
                sp.seed = (sampling.seed + j) % 2**64
            rid = request_id if k == 0 or not request_id else f"{request_id}-{k}"
            out.append(inference_pb2.GenerateRequest(request_id=rid if len(rid) <= 128 else "", model=model,
                                                     prompt=prompt, sampling=sp))
    return out


def _content(content: object, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported (this model reads text)",
                           "messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")


def sampling_params(body: dict, logprobs: int | None = None, max_tokens_key: str = "max_tokens") -> \
        common_pb2.SamplingParams:
    """The SamplingParams fields, from OpenAI's names and vLLM's extra ones (top_k, min_p, ...). Types are
    checked here; ranges by the worker, as for a gRPC request."""
    sp = common_pb2.SamplingParams()
    max_tokens = _opt_int(body, max_tokens_key, 1, 2**31)
    if max_tokens is not None:
        sp.max_tokens = max_tokens
    for key in ("temperature", "top_p", "repetition_penalty"):
        value = _opt_float(body, key)
        if value is not None:
            setattr(sp, key, value)
    for key in ("min_p", "presence_penalty", "frequency_penalty"):
        value = _opt_float(body, key)
        if value is not None:
            setattr(sp, key, value)
    for key, low in (("top_k", -1), ("min_tokens", 0)):
        value = _opt_int(body, key, low, 2**31)
        if value is not None:
            setattr(sp, key, max(value, 0))  # vLLM's top_k -1 means "all", as 0 does here
    seed = _opt_int(body, "seed", -(2**63), 2**64)
    if seed is not None:
        sp.seed = seed % 2**64
    stop = body.get("stop")
    if isinstance(stop, str):
        sp.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        sp.stop.extend(stop)
    elif stop is not None:
        raise bad_request("stop must be a string or a list of strings", "stop")
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not (isinstance(ids, list) and all(_is_int(i) and i >= 0 for i in ids)):
            raise bad_request("stop_token_ids must be a list of token ids", "stop_token_ids")
        sp.stop_token_ids.extend(ids)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos must be true or false", "ignore_eos")
    sp.ignore_eos = ignore_eos
    if logprobs is not None:
        sp.logprobs = logprobs
    return sp


def _refuse_unsupported(body: dict) -> None:
    if body.get("best_of") not in (None, 1):
        raise bad_request("best_of is not supported; send several requests and pick", "best_of")
    if body.get("echo"):
        raise bad_request("echo is not supported", "echo")
    if body.get("suffix"):
        raise bad_request("suffix is not supported", "suffix")
    if body.get("logit_bias"):
        raise bad_request("logit_bias is not supported", "logit_bias")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    return stream, options.get("include_usage", False)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the base model's name or an adapter's (GET /v1/models lists them)",
                          "model")
    return model


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, key: str, low: int, high: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v) or not low <= v < high:
        raise bad_request(f"{key} must be an integer in [{low}, {high})", key)
    return v


def _opt_float(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"{key} must be a number", key)
    return float(v)


def bad_request(message: str, param: str | None = None) -> errors.InvalidArgumentError:
    """INVALID_ARGUMENT (HTTP 400) naming the offending field as OpenAI's error object's `param`."""
    e = errors.InvalidArgumentError(message)
    e.param = param
    return e


# -- responses ----------------------------------------------------------------------------------------

def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def usage(choices: Sequence[Sequence[Delta]], n: int = 1) -> dict | None:
    """The request's usage over its choices (each a list of deltas, prompt-major with n samples a prompt): each
    prompt's tokens once, as vLLM counts them, and every choice's completion tokens."""
    last = [next((d.usage for d in reversed(deltas) if d.usage is not None), None) for deltas in choices]
    if not last or any(u is None for u in last):
        return None
    prompt = sum(u.prompt_tokens for k, u in enumerate(last) if k % n == 0)
    completion_tokens = sum(u.completion_tokens for u in last)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def completion(request_id: str, model: str, choices: Sequence[Sequence[Delta]], with_logprobs: bool,
               n: int = 1) -> dict:
    return {
        "id": completion_id(request_id), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": k, "text": "".join(d.text for d in deltas),
                     "logprobs": completion_logprobs(deltas) if with_logprobs else None,
                     **_finish(deltas)} for k, deltas in enumerate(choices)],
        "usage": usage(choices, n),
    }


def _finish(deltas: Sequence[Delta]) -> dict:
    last = deltas[-1] if deltas else Delta()
    return {"finish_reason": _FINISH.get(last.finish_reason), "stop_reason": last.stop_reason or None}


def completion_chunk(request_id: str, model: str, created: int, d: Delta, first: bool, with_logprobs: bool,
                     index: int = 0) -> dict:
    choice = {"index": index, "text": d.text, "logprobs": completion_logprobs([d]) if with_logprobs else None}
    return _chunk(completion_id(request_id), "text_completion", created, model, choice, d)


def completion_usage_chunk(request_id: str, model: str, created: int, deltas_usage: dict | None) -> dict:
    return _usage_chunk(completion_id(request_id), "text_completion", created, model, deltas_usage)


def _chunk(chunk_id: str, kind: str, created: int, model: str, choice: dict, d: Delta) -> dict:
    """One streamed chunk: the choice, with its finish and stop reasons once the delta ends the request."""
    choice = {**choice, "finish_reason": _FINISH.get(d.finish_reason),
              "stop_reason": (d.stop_reason or None) if d.finish_reason else None}
    return {"id": chunk_id, "object": kind, "created": created, "model": model, "choices": [choice]}


def _usage_chunk(chunk_id: str, kind: str, created: int, model: str, deltas_usage: dict | None) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {"id": chunk_id, "object": kind, "created": created, "model": model, "choices": [], "usage": deltas_usage}


def completion_logprobs(deltas: Sequence[Delta]) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs (text -> logprob)."""
    tokens, token_lps, tops = [], [], []
    for d in deltas:
        for lp in d.logprobs:
            tokens.append(_token_text(d, lp))
            token_lps.append(lp.logprob)
            tops.append({t.text or f"token_id:{t.token_id}": t.logprob for t in lp.top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": []}


def model_card(m: ModelEntry) -> dict:
    """One entry of /v1/models in vLLM's shape: an adapter's parent is its base model."""
    a = m.adapter
    return {"id": m.id, "object": "model", "created": a.created if a and a.created else int(time.time()),
            "owned_by": OWNED_BY, "root": (a.source_uri or m.id) if a else m.base_model,
            "parent": m.base_model if a else None, "max_model_len": m.max_model_len or None, "permission": []}


def chat_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def chat_completion(request_id: str, model: str, choices: Sequence[Sequence[Delta]], with_logprobs: bool,
                    n: int = 1) -> dict:
    return {
        "id": chat_id(request_id), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": k, "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                     "logprobs": chat_logprobs(deltas) if with_logprobs else None,
                     **_finish(deltas)} for k, deltas in enumerate(choices)],
        "usage": usage(choices, n),
    }


def chat_chunk(request_id: str, model: str, created: int, d: Delta, first: bool, with_logprobs: bool,
               index: int = 0) -> dict:
    delta = {"role": "assistant", "content": d.text} if first else ({"content": d.text} if d.text else {})
    choice = {"index": index, "delta": delta, "logprobs": chat_logprobs([d]) if with_logprobs else None}
    return _chunk(chat_id(request_id), "chat.completion.chunk", created, model, choice, d)


def chat_usage_chunk(request_id: str, model: str, created: int, deltas_usage: dict | None) -> dict:
    return _usage_chunk(chat_id(request_id), "chat.completion.chunk", created, model, deltas_usage)


def chat_logprobs(deltas: Sequence[Delta]) -> dict:
    """The chat logprobs object: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    content = []
    for d in deltas:
        for lp in d.logprobs:
            token = _token_text(d, lp)
            content.append({"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                            "top_logprobs": [{"token": t.text or f"token_id:{t.token_id}", "logprob": t.logprob,
                                              "bytes": list(t.text.encode())} for t in lp.top]})
    return {"content": content}


def _token_text(d: Delta, lp) -> str:
    """A sampled token's text: from the alternatives when it is among them, else the delta's text when the
    delta is that one token, else its id."""
    for t in lp.top:
        if t.token_id == lp.token_id and t.text:
            return t.text
    if len(d.logprobs) == 1 and len(d.token_ids) == 1:
        return d.text
    return f"token_id:{lp.token_id}"


@dataclass(frozen=True)
class Shapes:
    """How one endpoint writes its answer: whole, a streamed chunk, the closing usage chunk."""

    whole: Callable[[str, str, Sequence[Sequence[Delta]], bool, int], dict]  # (id, model, choices, logprobs, n)
    chunk: Callable[[str, str, int, Delta, bool, bool, int], dict]  # (..., delta, first, logprobs, choice index)
    usage_chunk: Callable[[str, str, int, dict | None], dict]


COMPLETION = Shapes(completion, completion_chunk, completion_usage_chunk)
CHAT = Shapes(chat_completion, chat_chunk, chat_usage_chunk)
