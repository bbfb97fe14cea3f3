"""The README's two commands are what CI runs, verbatim."""
import re

from conftest import REPO


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup in ci and tests in ci
    assert "pytest" in tests and "ffexport onnx" in setup
