"""The inner loop: fine-tuning, its state and checkpoints, probes, watching, mitigations, pretraining."""
