"""The one exception type that reaches a user as a single line.

Everything the user can get wrong (a model name, a path, a coordinate, a text) raises
`SwLensError` with a message that says what was asked and what would be valid. The
command-line entry points print it as one line and exit with code 2; library users
catch it like any other exception.
"""


class SwLensError(Exception):
    """Bad input or an unusable result, explained in one line."""


class NonFiniteActivation(SwLensError):
    """A forward pass produced inf/NaN (typically float16 overflow of a super activation)."""
