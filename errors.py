"""
A user's mistake (a bad file, a flag that does not fit, a stale stage), told in one line: every file
may raise UsageError, and the command lines (dpo.py, plots/, data/*/prepare.py) print it without a
traceback. It lives here, below every other file, so that the bottom ones (model.py, data/corpus.py)
import nothing above them.
"""


class UsageError(ValueError):
    """A user's mistake: the command line prints it as one line, no traceback."""
