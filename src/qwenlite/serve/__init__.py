"""Serving: the batched engine over token ids (no HTTP), prompt-state reuse, the OpenAI API and the app."""
