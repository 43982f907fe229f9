"""GPU worker: the multi-LoRA inference engine and its gRPC service."""
