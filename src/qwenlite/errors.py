"""The errors qwenlite raises on purpose, one family: the CLI prints any of them in one line and exits non-zero,
the server answers them with a 4xx in the OpenAI error shape. Anything else is a bug and shows as one."""


class QwenliteError(Exception):
    """An error caused by the user's input (model path, checkpoint, prompt, request, flags). `param`: the name of the
    input at fault where one is (a request field, a sampling setting), for the server's error body."""

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        self.param = param


class CheckpointError(QwenliteError):
    """A checkpoint that cannot be loaded: missing or corrupt files, an unknown architecture, missing or
    unexpected tensors."""


class InvalidArgument(QwenliteError, ValueError):
    """A value out of its range: a sampling parameter, a group size, a flag."""


class ContextLengthExceeded(QwenliteError, ValueError):
    """More tokens than the context, or the cache, holds."""


class KernelError(QwenliteError):
    """qwenlite's C kernels and their Python description disagree (a build from another version)."""


class InvalidImage(QwenliteError, ValueError):
    """An image that cannot be read: not an image, corrupt, truncated, too large, or of an impossible shape."""


class InvalidVideo(QwenliteError, ValueError):
    """A video that cannot be read: not a video, corrupt, truncated, without frames, too long or too large."""


class GrammarError(InvalidArgument):
    """A constraint for structured output that cannot be compiled (a JSON schema, regex or grammar the engine
    refuses, tools whose parameters cannot be written), with the engine's reason."""
