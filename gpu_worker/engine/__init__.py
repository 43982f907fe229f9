"""The multi-LoRA inference engine. Offline use, as in vLLM:

    from gpu_worker.engine import LLM, SamplingParams, LoRARequest
"""

from .config import EngineArgs
from .llm import LLM
from .llm_engine import LLMEngine
from .lora_request import LoRARequest
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LLMEngine", "LoRARequest", "RequestOutput", "SamplingParams"]
