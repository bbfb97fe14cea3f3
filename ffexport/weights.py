"""Find, verify and load FeatherFace checkpoints.

A model name resolves to a file in $FFEXPORT_WEIGHTS_DIR, then the user cache, then a download of the
published checkpoint (sha256-checked) into the cache.
"""
import os
from pathlib import Path

import torch

from ffexport.models import MODELS, ModelSpec

from .cache import cache_dir, download, sha256sum
from .errors import FFExportError


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise FFExportError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


def resolve(name: str, weights=None, allow_download=True) -> Path:
    """Path of the checkpoint for model `name` (or the explicit `weights` path)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FFExportError(f"weights file {path} does not exist: check --weights, or drop it to use the "
                                f"published {name} checkpoint")
        return path
    s = spec(name)
    env = os.environ.get("FFEXPORT_WEIGHTS_DIR")
    if env and not Path(env).is_dir():
        raise FFExportError(f"FFEXPORT_WEIGHTS_DIR={env} is not a folder: fix it, unset it, or pass --weights PATH")
    if env and (Path(env) / s.filename).is_file():
        return Path(env) / s.filename
    cached = cache_dir("weights") / s.filename
    if cached.is_file():
        return cached
    if not allow_download:
        raise FFExportError(f"no {name} weights found: pass --weights PATH or set FFEXPORT_WEIGHTS_DIR to a folder "
                            f"holding {s.filename}")
    url = os.environ.get(f"FFEXPORT_{name.upper()}_URL", s.url)
    return download(url, cached, s.sha256, f"FeatherFace {name} weights",
                    f"check the network, or download {s.url} yourself and pass --weights PATH (or put "
                    f"{s.filename} in a folder named by FFEXPORT_WEIGHTS_DIR, for every command)")


def read_state_dict(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        raise FFExportError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}): "
                            f"re-download it or pass the right --weights") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FFExportError(f"{path} holds no state_dict of tensors: pass a FeatherFace checkpoint")
    # Checkpoints saved from DataParallel carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in sd.items()}


def which_model(sd: dict) -> str | None:
    """The registered model whose parameter names and shapes match `sd` exactly, if any."""
    for name, s in MODELS.items():
        ref = s.create().state_dict()
        if ref.keys() == sd.keys() and all(ref[k].shape == sd[k].shape for k in ref):
            return name
    return None


def load_model(name: str | None = "v2", weights=None, dcn: str = "grid") -> torch.nn.Module:
    """The FeatherFace model `name` with its checkpoint loaded strictly, in eval mode; name None: whichever
    model the checkpoint `weights` is (told from its keys, the file read once). `model.name` says which."""
    from ffexport.models.dcn import set_dcn_form

    if name is None and weights is None:
        name = "v2"
    path = resolve(name, weights) if name is not None else Path(weights)
    sd = read_state_dict(path)
    found = which_model(sd)
    if found is None:
        raise FFExportError(f"{path} is not a FeatherFace V1/V2 checkpoint (parameter names/shapes differ): "
                            f"pass a checkpoint trained with this architecture")
    if name is not None and found != name:
        raise FFExportError(f"{path} is a FeatherFace {found} checkpoint, not {name}: use --model {found}")
    model = spec(found).create()
    model.name = found
    model.load_state_dict(sd, strict=True)
    model.checkpoint_sha256 = sha256sum(path)
    return set_dcn_form(model.eval(), dcn)
