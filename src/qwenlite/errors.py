class QwenliteError(Exception):
    """An error caused by the user's input (model path, checkpoint, prompt, request); the CLI prints it in one line."""
