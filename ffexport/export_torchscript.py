"""TorchScript export: traced and frozen (conv-BN folding etc.); loads with plain torch.jit.load.

torch.jit.optimize_for_inference's MKLDNN rewrite does not survive save/load in torch 2.13
("required keyword attribute 'value' is undefined"), so the saved file is the frozen graph and the
runner applies optimize_for_inference after loading, where it is valid.
"""
import json
import sys
import warnings

import torch

from .cache import atomic_output
from .meta import artifact_metadata


def export_torchscript(model, name, out, input_size=(640, 640), dcn="grid"):
    from models.dcn import set_dcn_form

    if dcn not in ("grid", "gather"):
        from .errors import FFExportError

        raise FFExportError(f"--dcn {dcn} is not available for TorchScript: use grid (default) or gather")
    set_dcn_form(model, dcn)
    dummy = torch.zeros(1, 3, *input_size)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape-derived Python ints (same-padding) are constants by design
        traced = torch.jit.trace(model, dummy, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
    meta = artifact_metadata(model, name, input_size, dcn)
    meta["input_size"] = list(input_size)
    with atomic_output(out) as tmp:
        torch.jit.save(frozen, str(tmp), _extra_files={"ffexport.json": json.dumps(meta)})
    set_dcn_form(model, "grid")
    print(f"wrote {out} (TorchScript, traced+frozen, {'x'.join(map(str, input_size))}, dcn={dcn})", file=sys.stderr)
