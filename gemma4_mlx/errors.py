"""User-facing errors.

Everything a user can cause (a bad path, a malformed checkpoint, a bad option) raises
``UserError`` with one line that names the file or field at fault. The CLI prints that line and
exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input: printed as one line by the CLI, exit status 2."""
