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


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM stopped a training run: after the current step, with a checkpoint
    (or at once, on a second signal). A BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it.

    The command line exits with status 128 + the signal number: 130 (SIGINT), 143 (SIGTERM).
    """

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by signal {signum}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum
