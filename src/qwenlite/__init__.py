"""qwenlite: run, serve, shrink, train and measure Qwen3.5 models."""

__version__ = "0.1.0"
