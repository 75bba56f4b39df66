"""Models on disk and back: Hugging Face checkpoints, quantized checkpoints, GGUF import and export, the hub,
atomic files, and the one loader every command uses (load.py)."""
