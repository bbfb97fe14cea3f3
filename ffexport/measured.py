"""Measured numbers the CLI prints (the `--dcn plain` and `--dcn fold` accuracy costs), in one packaged file.

`ffexport/measured.json` is derived from benchmarks/results/*.json by `python benchmarks/run.py --measured`
(run after re-measuring with `--only plain` or `benchmarks/fold.py`); tests/test_readme.py checks the two agree.
Kept as package data so an installed ffexport prints the same numbers as a checkout.
"""
import json
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).with_name("measured.json")


@lru_cache(maxsize=None)
def measured(key: str) -> dict:
    """One measurement record of measured.json ("plain_dcn", "fold")."""
    return json.loads(PATH.read_text())[key]


def ap_text(ap) -> str:
    return "/".join(f"{a:.1f}" for a in ap)
