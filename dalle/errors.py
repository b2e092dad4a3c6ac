"""The errors a user can cause and fix. Every such error class also derives from `UserError`,
so the CLI prints it as one clear line (not a traceback) and the flows do not retry it."""


class UserError(Exception):
    """A bad input, setting or order of commands; the message says what to do."""


# A stage run before the one it needs raises FileNotFoundError with the command to run first.
USER_ERRORS = (UserError, FileNotFoundError)
