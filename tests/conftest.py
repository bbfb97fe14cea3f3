import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FFEXPORT_SHARED", REPO.parent / "shared"))
IMAGES = SHARED / "images"
# The real photos (a crowd, groups, portraits) every parity test runs on.
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
WEIGHTS = Path(os.environ.get("FFEXPORT_WEIGHTS_DIR", SHARED / "weights"))
WIDERFACE = Path(os.environ.get("FFEXPORT_WIDERFACE", SHARED / "widerface"))


@pytest.fixture(autouse=True, scope="session")
def _weights_env():
    # The product looks weights up by name; point it at the shared checkpoints, never the network.
    os.environ.setdefault("FFEXPORT_WEIGHTS_DIR", str(WEIGHTS))
    os.environ.setdefault("FFEXPORT_WIDERFACE", str(WIDERFACE))
    os.environ.setdefault("FFEXPORT_PEERS_DIR", str(SHARED / "peers"))  # peer detectors: the shared copies


@pytest.fixture(scope="session")
def v2_model():
    from ffexport.weights import load_model

    return load_model("v2")


@pytest.fixture(scope="session")
def v1_model():
    from ffexport.weights import load_model

    return load_model("v1")
