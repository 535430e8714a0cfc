"""``finetune``: LoRA training on a Stable Diffusion base model (spec, run, trainer, training-set checks)."""
