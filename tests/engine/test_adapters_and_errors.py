"""Adapters the engine refuses (with a reason), host-memory eviction order, and cancellation leaving no
KV block or adapter slot behind. After every refusal the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from demo.adapters import build_lora_adapter
from demo.model import build_llama
from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams
from gpu_worker.engine.errors import AdapterError, CapacityError, InvalidRequestError

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=2,
                                                 max_cpu_loras=2, max_lora_rank=8, num_kv_blocks=64))


def run_all(engine):
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def still_serves(engine, adapters):
    engine.add_request("ok-base", "hello", GREEDY)
    engine.add_request("ok-lora", "hello", GREEDY, LoRARequest("sql-lora", 1, str(adapters["sql-lora"])))
    done = run_all(engine)
    assert len(done["ok-base"].outputs[0].token_ids) == 4 and len(done["ok-lora"].outputs[0].token_ids) == 4


def copy_adapter(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def refusal_cases(adapters, tmp):
    yield "rank", "code-lora", adapters["code-lora"], "max_lora_rank"
    yield "not_found", "ghost", tmp / "does-not-exist", "not a directory"
    missing = copy_adapter(adapters["sql-lora"], tmp / "no-weights")
    (missing / "adapter_model.safetensors").unlink()
    (missing / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    yield "not_found", "no-weights", missing, "pickle"
    yield "unsupported", "dora", copy_adapter(adapters["sql-lora"], tmp / "dora",
                                              lambda c: c.update(use_dora=True)), "DoRA"
    yield "unsupported", "mts", copy_adapter(adapters["sql-lora"], tmp / "mts",
                                             lambda c: c.update(modules_to_save=["lm_head"])), "modules_to_save"
    yield "unsupported", "ia3", copy_adapter(adapters["sql-lora"], tmp / "ia3",
                                             lambda c: c.update(peft_type="IA3")), "LORA"
    bad_json = copy_adapter(adapters["sql-lora"], tmp / "badjson")
    (bad_json / "adapter_config.json").write_text("{not json")
    yield "invalid", "badjson", bad_json, "JSON"
    truncated = copy_adapter(adapters["sql-lora"], tmp / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    yield "invalid", "truncated", truncated, "safetensors"
    for bad in ("nan", "inf"):
        poisoned = copy_adapter(adapters["sql-lora"], tmp / f"poisoned-{bad}")
        tensors = load_file(poisoned / "adapter_model.safetensors")
        victim = sorted(k for k in tensors if "lora_B" in k)[-1]
        tensors[victim].view(-1)[3] = float(bad)
        save_file(tensors, str(poisoned / "adapter_model.safetensors"))
        layer, module = victim.split(".layers.")[1].split(".")[0], victim.split(".")[-3]
        yield "invalid", f"poisoned-{bad}", poisoned, f"layer {layer} {module} holds NaN or infinite"
    other_base = build_llama(tmp / "other-base", hidden_size=32, num_heads=2, num_kv_heads=1)
    yield "mismatch", "other", build_lora_adapter(other_base, tmp / "other-lora", r=4, lora_alpha=8,
                                                  target_modules=["q_proj"], seed=9), "base model"


def test_refusals_are_clear_and_leave_nothing(engine, tiny_adapters, tmp_path):
    free = engine.blocks.num_free
    for i, (kind, name, path, words) in enumerate(refusal_cases(tiny_adapters, tmp_path)):
        with pytest.raises(AdapterError) as err:
            engine.add_request(f"bad-{i}", "hello", GREEDY, LoRARequest(name, 100 + i, str(path)))
        assert err.value.kind == kind, (name, err.value)
        assert words.lower() in str(err.value).lower(), (name, str(err.value))
        assert engine.get_num_unfinished_requests() == 0 and engine.blocks.num_free == free
    still_serves(engine, tiny_adapters)


def test_other_base_model_name_refused(engine, tiny_adapters):
    req = LoRARequest("sql-lora", 1, str(tiny_adapters["sql-lora"]), base_model_name="meta-llama/Llama-3-8B")
    with pytest.raises(AdapterError, match="base model"):
        engine.add_request("x", "hello", GREEDY, req)


def test_bad_requests(engine, tiny_adapters):
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", "", GREEDY)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request("long", list(range(5, 5 + 600)), GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("vocab", [1, 10**6], GREEDY)
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=float("nan"))
    engine.add_request("dup", "hi", GREEDY)
    with pytest.raises(InvalidRequestError, match="already"):
        engine.add_request("dup", "hi", GREEDY)
    run_all(engine)
    still_serves(engine, tiny_adapters)


def test_kv_capacity_refusal(tiny_model_dir):
    small = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), num_kv_blocks=2, block_size=8))
    with pytest.raises(CapacityError, match="KV cache"):
        small.add_request("big", list(range(5, 40)), GREEDY)


def test_host_lru_eviction_order(tiny_model_dir, tiny_adapters):
    eng = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=1,
                                                max_cpu_loras=2, max_lora_rank=16, num_kv_blocks=64))
    names = ["sql-lora", "chat-lora", "math-lora"]
    keys = {n: eng.lora.resolve(LoRARequest(n, i + 1, str(tiny_adapters[n]))) for i, n in enumerate(names[:2])}
    assert eng.lora.host.keys() == [keys["sql-lora"], keys["chat-lora"]]
    eng.lora.resolve(LoRARequest("sql-lora", 1, str(tiny_adapters["sql-lora"])))  # touch: now most recent
    keys["math-lora"] = eng.lora.resolve(LoRARequest("math-lora", 3, str(tiny_adapters["math-lora"])))
    # sql-lora was touched after chat-lora, so chat-lora is the one evicted.
    assert eng.lora.host.keys() == [keys["sql-lora"], keys["math-lora"]]
    # An adapter evicted from host memory is read again when a request needs it, and still correct.
    eng.add_request("again", "hello", GREEDY, LoRARequest("chat-lora", 2, str(tiny_adapters["chat-lora"])))
    assert len(run_all(eng)["again"].outputs[0].token_ids) == 4


def test_cancellation_frees_blocks_and_slots(engine, tiny_adapters):
    free = engine.blocks.num_free
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(["sql-lora", None, "chat-lora", "sql-lora"]):
        lora = None if name is None else LoRARequest(name, i + 1, str(tiny_adapters[name]))
        engine.add_request(f"c{i}", "some prompt text here", long, lora)
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < free
    assert sum(engine.lora.slots.in_use(k) for k in engine.lora.slots.resident()) == 3
    outs = engine.abort_request([f"c{i}" for i in range(4)] + ["unknown"])
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] * 4
    assert engine.blocks.num_free == free and not engine.has_unfinished_requests()
    assert all(engine.lora.slots.in_use(k) == 0 for k in engine.lora.slots.resident())


def test_reloaded_adapter_is_a_new_version(engine, tiny_adapters, tmp_path):
    """Same name, new content: a different key, so the old version's slot or host copy is never used."""
    path = copy_adapter(tiny_adapters["sql-lora"], tmp_path / "sql-v1")
    k1 = engine.lora.resolve(LoRARequest("sql-lora", 1, str(path)))
    shutil.rmtree(path)
    shutil.copytree(tiny_adapters["chat-lora"], path)
    k2 = engine.lora.resolve(LoRARequest("sql-lora", 1, str(path)))
    assert k1[0] == k2[0] and k1[1] != k2[1]


def test_config_edit_is_a_new_version(engine, tiny_adapters, tmp_path):
    """alpha lives in adapter_config.json: editing only the config changes the content hash."""
    path = copy_adapter(tiny_adapters["sql-lora"], tmp_path / "sql-edit")
    k1 = engine.lora.resolve(LoRARequest("sql-edit", 7, str(path)))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 2
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    assert engine.lora.resolve(LoRARequest("sql-edit", 7, str(path)))[1] != k1[1]


def test_host_copy_of_a_queued_adapter_is_kept(tiny_model_dir, tiny_adapters):
    """max_cpu_loras=1 and three adapters queued: each stays in host memory until its request is done, so no
    request is ever served from a re-read of its directory."""
    eng = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=1,
                                                max_cpu_loras=1, max_lora_rank=16, num_kv_blocks=64))
    names = ["sql-lora", "chat-lora", "math-lora"]
    for i, n in enumerate(names):
        eng.add_request(n, "hello", GREEDY, LoRARequest(n, i + 1, str(tiny_adapters[n])))
    assert len(eng.lora.host) == 3  # over capacity while pinned
    run_all(eng)
    eng.lora.resolve(LoRARequest("code-lora", 9, str(tiny_adapters["code-lora"])))
    assert len(eng.lora.host) == 1  # back to capacity once nothing is pinned


def test_staged_adapter_is_read_once_off_thread(tiny_model_dir, tiny_adapters):
    """stage() (from a pool thread) reads and packs; resolve() on the engine thread then only files it."""
    import threading

    eng = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=1,
                                                max_lora_rank=16, num_kv_blocks=64))
    reads = []
    original = eng.lora._read
    eng.lora._read = lambda key, root: reads.append(key) or original(key, root)
    req = LoRARequest("chat-lora", 2, str(tiny_adapters["chat-lora"]))
    worker = threading.Thread(target=eng.lora.stage, args=(req,))
    worker.start()
    worker.join()
    eng.add_request("staged", "hello", GREEDY, req)
    assert len(reads) == 1 and len(run_all(eng)["staged"].outputs[0].token_ids) == 4
    # stage() refuses what resolve() refuses, with the same error.
    small = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_lora_rank=8,
                                                  num_kv_blocks=8))
    with pytest.raises(AdapterError, match="max_lora_rank"):
        small.lora.stage(LoRARequest("big", 3, str(tiny_adapters["code-lora"])))


def outputs_beside_cumulative(engine, kind: str) -> dict[str, list]:
    """Every output of two greedy 6-token requests with logprobs, one "cum"ulative, one of output_kind `kind`,
    stepped together; by request id ("cum" and `kind`)."""
    params = dict(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    engine.add_request("cum", "hello there", SamplingParams(**params))
    engine.add_request(kind, "hello there", SamplingParams(**params, output_kind=kind))
    seen = {"cum": [], kind: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    return seen


def test_delta_outputs_carry_only_what_is_new_and_the_last_carries_all(engine, tiny_adapters):
    """output_kind="delta" (what the worker's streams use): no per-step copy of the growing output; the deltas
    add up to the last output's totals, which match a cumulative request's."""
    seen = outputs_beside_cumulative(engine, "delta")
    *middle, last = seen["delta"]
    assert middle and all(o.outputs[0].token_ids == [] and o.outputs[0].logprobs == [] for o in middle)
    assert all(o.outputs[0].text == "" for o in middle)
    assert [t for o in seen["delta"] for t in o.outputs[0].delta_token_ids] == last.outputs[0].token_ids
    assert "".join(o.outputs[0].delta_text for o in seen["delta"]) == last.outputs[0].text
    assert last.outputs[0].text == seen["cum"][-1].outputs[0].text and last.outputs[0].text
    assert last.outputs[0].token_ids == seen["cum"][-1].outputs[0].token_ids and len(last.outputs[0].logprobs) == 6
    assert seen["cum"][0].outputs[0].token_ids  # cumulative: every output holds the tokens so far
    with pytest.raises(InvalidRequestError, match="output_kind"):
        SamplingParams(output_kind="final")


def test_final_only_outputs_come_once_and_hold_everything(engine):
    """output_kind="final_only" (LLM.generate's): no output until the request finishes; that one holds every token,
    the whole text, and as deltas all of it; the tokens and text match a cumulative request's."""
    seen = outputs_beside_cumulative(engine, "final_only")
    [last] = seen["final_only"]
    got, want = last.outputs[0], seen["cum"][-1].outputs[0]
    assert last.finished and got.token_ids == got.delta_token_ids == want.token_ids and len(got.token_ids) == 6
    assert got.text == got.delta_text == want.text and len(got.logprobs) == 6
    assert len(seen["cum"]) > 1
