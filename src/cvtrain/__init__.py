"""cvtrain: train, babysit and compare the classic image classifiers."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with what the user asked for: the message names it and the fix.

    The command line prints it without a traceback and exits with status 2.
    """
