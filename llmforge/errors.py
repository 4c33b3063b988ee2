"""The one exception type that the command line turns into a clean error message."""


class ForgeError(Exception):
    """A failure the user can fix: bad input, a missing file or package, a conflicting output.

    The `forge` command prints the message on stderr and exits with status 1, without a
    traceback unless `--debug` is given. The message names the value and the next step.
    """
