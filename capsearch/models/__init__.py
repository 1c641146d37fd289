"""The diffusion models: loading, the tiny architecture, tokenizer, sampling, delta checkpoints."""
