"""Text at the edges: the runtime tokenizer and chat template, building vocabularies, token-to-text streaming
and tool-call parsing."""
