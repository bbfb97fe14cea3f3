"""Adding a format is one module and one line: a throwaway format (torch.export's .pt2 archive, a real export
and a real runner) dropped into a copy of the package shows up in `ffexport info`, gets its export command
(which exports and checks itself) and its bench target, with no other file touched."""
import difflib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

PT2 = '''"""torch.export archive (.pt2): a throwaway format for tests/test_new_format.py."""
import numpy as np

from ..runner import Runner
from .base import Format


class Pt2Runner(Runner):
    kind = "pt2"

    def __init__(self, path, threads=None):
        import torch

        extra = {"input_size": ""}
        self.path, self.module = path, torch.export.load(str(path), extra_files=extra).module()
        self.input_size = tuple(int(v) for v in extra["input_size"].split("x"))

    def __call__(self, x):
        import torch

        with torch.no_grad():
            return tuple(t.numpy() for t in self.module(torch.from_numpy(np.ascontiguousarray(x))))


def _export(model, name, out, opts):
    import torch

    ep = torch.export.export(model, (torch.zeros(1, 3, *opts.input_size),))
    torch.export.save(ep, str(out), extra_files={"input_size": "x".join(map(str, opts.input_size))})
    return {"dcn": opts.dcn}


FORMAT = Format(name="pt2", description="torch.export archive (test format)", suffixes=(".pt2",),
                export=_export, runner=lambda path, threads=None: Pt2Runner(path, threads))
'''


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("newformat")
    shutil.copytree(REPO / "ffexport", root / "ffexport", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "ffexport/formats/pt2.py").write_text(PT2)
    init = root / "ffexport/formats/__init__.py"
    src = init.read_text()
    start = src.index("MODULES = (")
    end = src.index("\n)", start)  # the one line: the new module's name, last in MODULES
    init.write_text(src[:end] + '\n    "pt2",' + src[end:])
    return root


def _run(tree, *args):
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-m", "ffexport", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tree, timeout=600)


def test_the_change_is_one_module_and_one_line(tree):
    changed = []
    for p in (tree / "ffexport").rglob("*.py"):
        orig = REPO / p.relative_to(tree)
        if not orig.exists():
            changed.append((p.relative_to(tree).as_posix(), "new"))
        elif orig.read_text() != p.read_text():
            diff = [l for l in difflib.unified_diff(orig.read_text().splitlines(), p.read_text().splitlines(), n=0)
                    if l[:1] in "+-" and not l.startswith(("+++", "---"))]
            changed.append((p.relative_to(tree).as_posix(), diff))
    assert sorted(changed) == [("ffexport/formats/__init__.py", ['+    "pt2",']), ("ffexport/formats/pt2.py", "new")]


def test_info_command_and_bench_target_appear(tree, tmp_path):
    info = _run(tree, "info")
    assert info.returncode == 0 and any(l.startswith("pt2 ") and ".pt2" in l for l in info.stdout.splitlines())
    assert "pt2 " in _run(tree, "info", "targets").stdout
    out = tmp_path / "v2.pt2"
    r = _run(tree, "pt2", "-o", out, "--input-size", "160x160")
    assert r.returncode == 0, r.stderr
    # The generic export path ran the new runner against PyTorch before reporting success.
    assert "check conf vs PyTorch" in r.stdout + r.stderr and out.is_file()
    r = _run(tree, "bench", "--target", "pt2", "--model", "v2", "--input-size", "160x160", "--runs", "3",
             "--warmup", "1")
    assert r.returncode == 0, r.stderr
    row = next(l for l in r.stdout.splitlines() if l.startswith("| pt2 | 160x160 |")).split("|")
    assert float(row[5]) > 0 and row[10].strip() == "ok", r.stdout


# Slow: real conversions / emulation in module fixtures (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
