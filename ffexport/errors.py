class FFExportError(Exception):
    """A user-facing problem: the CLI prints it as one line (problem + fix) and exits non-zero.

    Library code raises it for bad input (missing weights, unreadable image, ...); anything else
    reaching the CLI is a bug and keeps its traceback.
    """

    exit_code = 2
