"""Errors that stand for a user mistake (bad input, bad settings): the CLI prints them as one line."""


class UserError(Exception):
    """An error in the user's input or settings, reported as one line without a traceback."""
