"""Errors that the command line reports as one clear message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, flags, data, workdir) that they can fix."""
