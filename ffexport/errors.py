class FFExportError(Exception):
    """A user-facing problem: the CLI prints it as one line (problem + fix) and exits non-zero.

    Library code raises it for bad input (missing weights, unreadable image, ...); anything else
    reaching the CLI is a bug and keeps its traceback.
    """

    exit_code = 2


class RuntimeUnavailable(FFExportError):
    """The artifact is fine but cannot run on this machine (e.g. Core ML off macOS): a distinct exit status,
    so no caller mistakes 'not measured' for 'passed'."""

    exit_code = 3
