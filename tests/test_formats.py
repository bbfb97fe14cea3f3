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
    assert "--dcn [auto|native|grid|gather|rows|fold|taps]" in r.stdout and "--quantize [int8|fp16]" in r.stdout


# The installed layout: models/ and calibration/ are ffexport.models and ffexport.calibration (setup.cfg).
PACKAGE_ROOTS = {"ffexport": "ffexport", "models": "ffexport.models", "calibration": "ffexport.calibration"}


def module_names() -> dict:
    """Every .py file of the installed packages -> its module name."""
    out = {}
    for d, name in PACKAGE_ROOTS.items():
        for p in (REPO / d).rglob("*.py"):
            parts = p.relative_to(REPO / d).with_suffix("").parts
            out[p] = ".".join((name, *parts)).removesuffix(".__init__")
    return out


def imports_of(path: Path, package_of: dict) -> set:
    """The project's modules that `path` imports anywhere: function-level imports, `from pkg import sub`
    (an edge to the submodule) and a package's imports of its own submodules all count."""
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
    if mod == "ffexport.formats":  # the format modules, imported by name from MODULES
        out |= {f"{mod}.{m}" for m in formats_modules()}
    known = set(package_of.values())
    return {m for m in out if m in known and m != mod}


def formats_modules() -> tuple:
    tree = ast.parse((REPO / "ffexport/formats/__init__.py").read_text())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "MODULES")


def find_cycle(graph: dict) -> list | None:
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d, stack + [d])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_find_cycle_sees_function_level_and_package_edges():
    assert find_cycle({"a": {"a.b"}, "a.b": {"c"}, "c": {"a"}}) == ["a", "a.b", "c", "a"]
    assert find_cycle({"a": {"a.b"}, "a.b": {"a.c"}, "a.c": set()}) is None


def test_no_import_cycles_and_models_never_import_the_rest():
    package_of = module_names()
    graph = {package_of[p]: imports_of(p, package_of) for p in package_of}
    assert {"ffexport.formats.onnx.quantize", "ffexport.models.dcn", "ffexport.calibration"} <= set(graph)
    for mod, deps in graph.items():
        if mod.startswith("ffexport.models"):
            assert all(d.startswith("ffexport.models") for d in deps), (mod, deps)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_unknown_format_and_runtime_are_one_line_errors(tmp_path):
    f = tmp_path / "x.tflite"
    f.write_bytes(b"0" * 64)
    assert_one_line_error(run_cli("parity", f, "--runtime", "opencv"), "runtime opencv does not run x.tflite")
