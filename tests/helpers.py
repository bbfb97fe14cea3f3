"""Small shared test utilities: run the CLI as a user does, serve files on 127.0.0.1."""
import contextlib
import functools
import http.server
import subprocess
import sys
import threading


def run_cli(*args, env=None, cwd=None):
    """Run `ffexport ARGS` in a subprocess (the real entry point, tracebacks would show)."""
    return subprocess.run([sys.executable, "-m", "ffexport", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@contextlib.contextmanager
def serve_dir(directory):
    """An HTTP server on 127.0.0.1 (random port) serving `directory`; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
