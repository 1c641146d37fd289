"""Export one trial: pipeline folder, delta, LoRA files, single-file checkpoint, model card."""
