"""The engine's step API with several adapters, as vLLM's `LLMEngine`: add requests, call step() until done;
every step runs one batch in which requests for different adapters mix.

    python examples/engine_step_api.py [--model DIR --adapters DIR]
"""

from _common import model_and_adapters

from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams


def main() -> None:
    args, model, adapters = model_and_adapters(__doc__)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(model), device=args.device, enable_lora=True,
                                                   max_loras=4, max_lora_rank=16, max_cpu_loras=4))
    loras = [LoRARequest(name, i + 1, str(adapters / name))
             for i, name in enumerate(("sql-lora", "chat-lora", "code-lora", "math-lora"))]
    requests = [(f"req-{i}", f"Prompt number {i}:", loras[i % len(loras)] if i % 5 else None) for i in range(10)]
    for rid, prompt, lora in requests:
        engine.add_request(rid, prompt, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=7),
                           lora_request=lora)
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            if out.finished:
                name = out.lora_request.lora_name if out.lora_request else "base"
                print(f"{out.request_id} [{name}] {out.outputs[0].text!r}")
    print(f"{len(requests)} requests, {len(loras)} adapters and the base model, in {steps} steps")


if __name__ == "__main__":
    main()
