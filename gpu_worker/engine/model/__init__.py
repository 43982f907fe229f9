"""The Llama-family model: config, weights, RoPE, paged attention and the forward pass."""
