"""Contrastive fine-tuning: config, losses and the Ray Train + DeepSpeed training loop."""
