"""cvtrain: train, babysit and compare the classic image classifiers."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with what the user asked for: the message names it and the fix.

    The command line prints it without a traceback and exits with status 2.
    """


class TrainingDiverged(Exception):
    """The loss became non-finite or exploded: the run stops, keeping its last good checkpoint.

    The command line exits with status 3 (in a sweep the trial is recorded as diverged).
    """


class ChecksFailed(Exception):
    """A check the user asked for (task=sanity, task=gradcheck) failed; its lines say which.

    The command line exits with status 1.
    """
