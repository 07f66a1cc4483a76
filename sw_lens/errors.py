"""The one exception type that reaches a user as a single line.

Everything the user can get wrong (a model name, a path, a coordinate, a text) raises
`SwLensError` with a message that says what was asked and what would be valid. The
command-line entry points print it as one line and exit with code 2; library users
catch it like any other exception.
"""

from contextlib import contextmanager


class SwLensError(Exception):
    """Bad input or an unusable result, explained in one line."""


class NonFiniteActivation(SwLensError):
    """A forward pass produced inf/NaN (typically float16 overflow of a super activation)."""


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


@contextmanager
def untrusted_files(what: str):
    """Whatever a loader raises on files we do not control is one line, `what: reason`:
    transformers, tokenizers and safetensors answer a malformed config, tokenizer or
    weight file with KeyError, TypeError, RuntimeError and more (a tokenizer.json without
    'added_tokens', num_hidden_layers = "6", a negative vocab_size)."""
    try:
        yield
    except SwLensError:
        raise
    except Exception as err:  # noqa: BLE001 - the file decides which type comes
        reason = first_line(err)
        if isinstance(err, KeyError):
            reason = f"a file lacks the entry {reason}"
        raise SwLensError(f"{what}: {reason}") from None
