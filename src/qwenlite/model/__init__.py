"""The network: the reference forward (qwen3_5.py), its cache, the quantized module swap, and the runner that
picks the fastest path for inference. Never imports loading, text, serving or training."""
