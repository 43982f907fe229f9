"""max_loras, max_cpu_loras and max_lora_rank, as in vLLM: how many adapters sit in GPU slots at once, how
many stay in host memory, and the largest rank accepted (an adapter over it is refused with the reason).

    python examples/lora_limits.py [--model DIR --adapters DIR]
"""

from _common import model_and_adapters

from gpu_worker.engine import LLM, LoRARequest, SamplingParams
from gpu_worker.engine.errors import AdapterError


def main() -> None:
    args, model, adapters = model_and_adapters(__doc__)
    # One GPU slot, two adapters in host memory, ranks up to 8: three adapters' requests still all finish
    # (a request waits for the slot; the one in the slot is never evicted while in use).
    llm = LLM(model=str(model), device=args.device, enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8)
    names = ("sql-lora", "chat-lora", "math-lora")  # ranks 4, 8, 8
    loras = [LoRARequest(n, i + 1, str(adapters / n)) for i, n in enumerate(names)]
    outs = llm.generate(["a", "b", "c", "d"], SamplingParams(temperature=0, max_tokens=4),
                        lora_request=[loras[0], loras[1], loras[2], loras[0]])
    print("max_loras=1: finished", [(o.lora_request.lora_name, o.outputs[0].finish_reason) for o in outs])
    try:
        llm.generate("x", SamplingParams(max_tokens=2), lora_request=LoRARequest("code-lora", 9,
                                                                                str(adapters / "code-lora")))
    except AdapterError as e:  # code-lora has rank 16
        print(f"max_lora_rank=8: refused ({e.kind}): {e}")


if __name__ == "__main__":
    main()
