"""FeatherFace model definitions, the deformable conv, pre- and post-processing.

The registry is one table: a name, its constructor and the published checkpoint it loads.
"""
from dataclasses import dataclass

from .featherface import FeatherFace


@dataclass(frozen=True)
class ModelSpec:
    name: str
    coordinate_attention: bool
    params: int
    filename: str
    sha256: str
    url: str

    def create(self) -> FeatherFace:
        return FeatherFace(coordinate_attention=self.coordinate_attention)


_UPSTREAM = "https://github.com/fokouarnaud/FeatherFace/raw/f02314524f7febcdc61d9a645b9bca3e8119b910/weights/"

MODELS = {
    "v1": ModelSpec("v1", False, 489_015, "featherface_v1.pth",
                    "3271e30763c069c9dcad6368ae048c53b6be2acf60179240e6b147e6359ef80d",
                    _UPSTREAM + "mobilenet0.25_Final.pth"),
    "v2": ModelSpec("v2", True, 493_095, "featherface_v2.pth",
                    "0460e4578f7ac409a71cebfd0dccbbc62d5ad15e14fe355914e2fdc9bc3acd0a",
                    _UPSTREAM + "v2/featherface_v2_best.pth"),
}
