"""Stable Diffusion side of the pipeline: components, fine-tuning (Ray Train + DeepSpeed), generation."""
