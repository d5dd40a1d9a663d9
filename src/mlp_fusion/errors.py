"""The one error type users see: what was wrong and what to do, printed without a traceback."""


class UserError(ValueError):
    """Bad input from the user (arguments, files, models). The CLI prints it on one line and exits with 2."""
