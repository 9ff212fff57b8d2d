"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class MatvlmError(Exception):
    """A problem with the user's input: a path, a recipe key, a ratio, a data record."""


class MatvlmWarning(UserWarning):
    """Something matvlm goes on with but the user should know: the CLI prints it as one line."""
