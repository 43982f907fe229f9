"""Offline inference with LoRA adapters, as vLLM's `LLM` API: one batch, base and adapter prompts mixed.

    python examples/offline_inference.py [--model DIR --adapters DIR]
"""

from _common import model_and_adapters

from gpu_worker.engine import LLM, LoRARequest, SamplingParams


def main() -> None:
    args, model, adapters = model_and_adapters(__doc__)
    llm = LLM(model=str(model), device=args.device, enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=4)
    sql = LoRARequest("sql-lora", 1, str(adapters / "sql-lora"))
    chat = LoRARequest("chat-lora", 2, str(adapters / "chat-lora"))
    prompts = ["Write a SQL query that counts users:", "Hello, my name is", "Tell me a story:"]
    params = SamplingParams(temperature=0.0, max_tokens=16, stop=["\n\n"])
    # one LoRARequest per prompt (None: the base model); all three share one batch
    for out in llm.generate(prompts, params, lora_request=[sql, None, chat]):
        adapter = out.lora_request.lora_name if out.lora_request else "base"
        print(f"[{adapter}] {out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")


if __name__ == "__main__":
    main()
