"""The formats table is the one place a format is declared: every entry complete, its extra real, no import
cycles anywhere in ffexport/ or models/, and every command reads the table."""
import ast
import configparser
from pathlib import Path

import pytest

from ffexport import formats
from ffexport.formats import FORMATS
from ffexport.formats.base import Format, Option
from ffexport.targets import targets
from helpers import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]


def _extras():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return set(cfg["options.extras_require"])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_format_declares_everything(fmt):
    assert isinstance(fmt, Format) and fmt.name and fmt.description
    assert fmt.suffixes and all(s.startswith(".") for s in fmt.suffixes)
    assert fmt.dcn_forms and fmt.default_dcn == fmt.dcn_forms[0] and fmt.precisions
    assert fmt.extra is None or fmt.extra in _extras(), f"extra {fmt.extra} missing from setup.cfg"
    assert fmt.extra is None or fmt.extra == fmt.name, "a format's extra is named after the format"
    for check in (fmt.available, fmt.runnable):
        reason = check()
        assert reason is None or (isinstance(reason, str) and "\n" not in reason and ":" in reason)
    assert all(isinstance(o, Option) for o in fmt.options)
    if fmt.export_as:
        assert formats.get(fmt.export_as).export is not None
    assert fmt.export is not None or fmt.export_as or fmt.name == "torch"


def test_names_are_unique_and_found_by_suffix():
    names = [f.name for f in FORMATS]
    assert len(names) == len(set(names))
    for f in FORMATS:
        if f.runner:
            assert formats.for_path(Path("x" + f.suffixes[0])).suffixes[0] == f.suffixes[0]
    assert formats.for_path(Path("a.onnx"), "opencv").name == "opencv"


def test_bench_targets_come_from_the_table():
    table = targets()
    for f in FORMATS:
        if f.runner or f.name == "torch":
            assert f.bench_name in table
    for legacy in ("torch", "torchscript", "onnxruntime", "onnxruntime-int8", "tflite", "tflite-int8", "coreml",
                   "onnxruntime-arm", "onnxruntime-arm-int8", "executorch", "opencv", "blazeface"):
        assert legacy in table


def test_every_export_format_has_its_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for f in FORMATS:
        if f.export:
            assert f"  {f.name} " in r.stdout
    r = run_cli("onnx", "--help")
    assert "--dcn [auto|native|grid|gather|rows|fold]" in r.stdout and "--quantize [int8|fp16]" in r.stdout


def _imports(path: Path, package_of: dict) -> set:
    """Modules of ffexport/ and models/ that `path` imports anywhere (function-level imports included)."""
    mod = package_of[path]
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    known = set(package_of.values())
    return {m for m in out if m in known and m != mod}


def test_no_import_cycles_and_models_never_import_ffexport():
    files = [p for d in ("ffexport", "models") for p in (REPO / d).rglob("*.py")]
    package_of = {p: ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in files}
    graph = {package_of[p]: _imports(p, package_of) for p in files}
    for mod, deps in graph.items():
        if mod.startswith("models"):
            assert not any(d.startswith("ffexport") for d in deps), (mod, deps)
    # A package's __init__ may list its submodules; a submodule importing its own package's names is the
    # cycle this test is for, so only package -> submodule edges are dropped.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_unknown_format_and_runtime_are_one_line_errors(tmp_path):
    f = tmp_path / "x.tflite"
    f.write_bytes(b"0" * 64)
    assert_one_line_error(run_cli("parity", f, "--runtime", "opencv"), "runtime opencv does not run x.tflite")
