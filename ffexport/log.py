"""The one place ffexport talks to the user (stderr) and keeps library noise out of sight.

Converters print progress, warnings and tensor dumps to stdout/stderr from Python and from C++. A user
sees ffexport's own lines; `--verbose` (or FFEXPORT_DEBUG=1) lets the libraries speak too.
"""
import contextlib
import logging
import os
import sys
import warnings

_verbose = os.environ.get("FFEXPORT_DEBUG", "") not in ("", "0")


def set_verbose(on: bool):
    global _verbose
    _verbose = bool(on) or _verbose


def verbose() -> bool:
    return _verbose


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence Python warnings, the named loggers and anything written to fd 1/2 (C++ included) in the
    block, unless verbose. What was written is kept and attached to an exception leaving the block, so a
    failure still shows the library's last words (`e.library_output`)."""
    if _verbose:
        yield
        return
    import tempfile

    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException as e:
            sys.stdout.flush(), sys.stderr.flush()
            sink.seek(0)
            e.library_output = sink.read()[-4000:].decode(errors="replace")
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
