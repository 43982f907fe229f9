"""LoRA adapters in the engine: reading PEFT checkpoints, device slots, and applying them to a batch."""
