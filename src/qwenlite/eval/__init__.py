"""Measuring a model's quality on text: `perplexity.py` (perplexity and bits per byte over a file, and the KL
divergence from a base model on the same positions). The eval layer sits beside serve/, train/ and bench.py: it
loads models through io/ and runs their forward, and nothing below imports it."""
