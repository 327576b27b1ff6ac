"""Scoring a bundle on real images: top-1, feature probes, few-shot draws, fine-tuning."""
