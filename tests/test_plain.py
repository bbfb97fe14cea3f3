"""`--dcn plain` is never silent: its measured AP cost is printed with it."""
import pytest
from helpers import run_cli


def test_plain_dcn_prints_its_measured_cost(tmp_path):
    r = run_cli("coreml", "--dcn", "plain", "--input-size", "320x320", "-o", tmp_path / "x.mlpackage")
    assert "--dcn plain drops the deformable offsets" in r.stderr and "AP" in r.stderr and "-91" in r.stderr


# Slow: a real Core ML conversion (the quick subset is `pytest -m "not slow"`).
pytestmark = pytest.mark.slow
