"""User cache, checksummed downloads and atomic writes: the one place files enter or leave ffexport."""
import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import FFExportError


def cache_dir(*parts: str) -> Path:
    env = os.environ.get("FFEXPORT_CACHE")
    if env is not None and not env.strip():
        raise FFExportError("FFEXPORT_CACHE is set but empty: unset it or point it at a writable folder")
    root = Path(env) if env else Path.home() / ".cache" / "ffexport"
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(path)
    except (FileExistsError, NotADirectoryError):
        raise FFExportError(f"cache folder {root} is a file, not a folder: set FFEXPORT_CACHE to a writable "
                            f"folder") from None
    except OSError as e:
        raise FFExportError(f"cannot use cache folder {root} ({type(e).__name__}): set FFEXPORT_CACHE to a "
                            f"writable folder") from None
    return path


def read_cached_array(path, shape):
    """A cached .npy if it is whole: its sha256 sidecar matches and its shape is `shape`; else the entry is
    discarded (a truncated or garbage cache file is rebuilt, never a reason to fail)."""
    import numpy as np

    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    try:
        if side.read_text().strip() == sha256sum(path):
            arr = np.load(path, allow_pickle=False)
            if arr.shape == tuple(shape) and arr.dtype == np.float32:
                return arr
    except (OSError, ValueError, EOFError):
        pass
    for p in (path, side):
        p.unlink(missing_ok=True)
    return None


def write_cached_array(path, arr):
    import numpy as np

    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        digest = sha256sum(tmp)
    with atomic_output(path.with_name(path.name + ".sha256")) as tmp:
        Path(tmp).write_text(digest)


def sha256sum(path, algo="sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(path, suffix=None):
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    An existing output is never left half-written, and a failed run leaves no partial file.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FFExportError(f"output folder {parent} does not exist: create it or choose another output path (-o/--json/--draw)")
    if not os.access(parent, os.W_OK):
        raise FFExportError(f"output folder {parent} is not writable: choose another output path (-o/--json/--draw)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=parent)
    os.close(fd)
    os.unlink(tmp)  # writers (onnx, coremltools) want to create the file or folder themselves
    try:
        yield Path(tmp)
        os.replace(tmp, path) if not (Path(tmp).is_dir() and path.is_dir()) else _replace_dir(tmp, path)
    finally:
        _remove(tmp)


def _replace_dir(tmp, path):
    import shutil

    shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(p):
    import shutil

    p = Path(p)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def download(url: str, dest, checksum: str, what: str, fix: str) -> Path:
    """Download `url` to `dest` with a progress bar, verifying the checksum before the file appears.

    `checksum` is a sha256 hex digest, or "md5:<hex>" where only an md5 is published.
    `what` names the thing ("FeatherFace v2 weights"), `fix` says what to do if it fails.
    """
    algo, _, expected = checksum.rpartition(":")
    algo = algo or "sha256"
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {what}",
                          disable=None) as bar:
                    for block in iter(lambda: r.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise FFExportError(f"could not download {what} from {url} ({e}): {fix}") from None
        got = sha256sum(tmp, algo)
        if got != expected:
            raise FFExportError(
                f"downloaded {what} has {algo} {got[:12]}…, expected {expected[:12]}… (corrupt or wrong file): {fix}")
    return dest
