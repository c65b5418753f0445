"""User-facing errors.

Everything a user can cause (a bad path, a malformed checkpoint, a bad option) raises
``UserError`` with one line that names the file or field at fault. The CLI prints that line and
exits with status 2; anything else is a bug and keeps its traceback.

A bad argument of the Python API raises ``BadArgument`` (a ``ValueError``) or ``BadArgumentType``
(also a ``TypeError``), whose message names the argument as the API spells it (``max_tokens must
be >= 1, got 0``). The CLI prints the same rule with its own option name (``--max-tokens must be
>= 1, got 0``): one rule, checked in one place, worded for whoever called.
"""


class UserError(ValueError):
    """A problem with the user's input: printed as one line by the CLI, exit status 2."""


class BadArgument(UserError):
    """Argument ``name`` has a bad value; ``detail`` says why (``must be >= 1, got 0``)."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"{name} {detail}")
        self.name = name
        self.detail = detail

    def worded_for(self, options: dict[str, str]) -> str:
        """The message with the argument named as ``options`` maps it (API name -> CLI flag)."""
        return f"{options.get(self.name, self.name)} {self.detail}"


class BadArgumentType(BadArgument, TypeError):
    """Argument ``name`` has the wrong type (``max_tokens must be an int, got 2.5``)."""
