"""The CLI's error model: a `UsageError` is a user's mistake, not a bug.

`open-clip-cxr` prints a `UsageError` (and a missing file, an offline hub, a refused checkpoint)
as one line on stderr that names the problem and the fix, and exits 2; anything else is a bug
and keeps its traceback. `UsageError` is a `ValueError`, so library callers can catch either.
Kept free of imports so that every module, however light, can raise it.
"""


class UsageError(ValueError):
    """A mistake in what the user asked for (a path, a name, a flag value, the data given)."""
