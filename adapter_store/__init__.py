"""The adapter store: adapter names -> validated PEFT LoRA files, cached on disk and streamed to workers."""
