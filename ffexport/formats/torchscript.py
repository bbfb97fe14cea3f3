"""TorchScript export: traced and frozen (conv-BN folding etc.); loads with plain torch.jit.load.

torch.jit.optimize_for_inference's MKLDNN rewrite does not survive save/load in torch 2.13
("required keyword attribute 'value' is undefined"), so the saved file is the frozen graph and the
runner applies optimize_for_inference after loading, where it is valid.
"""
import json
import warnings
from pathlib import Path

import torch

from ..cache import atomic_output
from ..errors import FFExportError
from ..meta import artifact_metadata
from .base import ExportOptions, Format, image_input_needs_nms
from ..e2e import detections_from_outputs, for_export, image_from_tensor, runner_io
from .pytorch import TorchRunner


def export_torchscript(model, name, out, input_size=(640, 640), dcn="grid", dummy=None, extra_meta=None):
    """Trace `model` (FeatherFace, or its end-to-end wrapper with `dummy` its sample input) to `out`."""
    from ffexport.models.dcn import dcn_form

    FORMAT.resolve(ExportOptions(dcn=dcn))  # called directly too, not only via the exporter
    dummy = torch.zeros(1, 3, *input_size) if dummy is None else dummy
    with dcn_form(model, dcn), torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape-derived Python ints (same-padding) are constants by design
        traced = torch.jit.trace(model, dummy, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
    meta = artifact_metadata(model, name, input_size, dcn, **(extra_meta or {}))
    meta["input_size"] = list(input_size)
    with atomic_output(out) as tmp:
        torch.jit.save(frozen, str(tmp), _extra_files={"ffexport.json": json.dumps(meta)})
    return {"dcn": dcn, "graph": "traced+frozen"}


class TorchScriptRunner(TorchRunner):
    kind = "torchscript"

    def __init__(self, path, threads=None):
        import torch

        extra = {"ffexport.json": ""}
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise FFExportError(f"{path} is not a loadable TorchScript file ({type(e).__name__}): "
                                f"re-export it with 'ffexport torchscript'") from None
        meta = json.loads(extra["ffexport.json"] or "{}")
        if meta.get("model") is None:
            raise FFExportError(f"{path} is a TorchScript file without ffexport's metadata (not a FeatherFace "
                                f"export): pass a file written by 'ffexport torchscript'")
        self.meta = meta
        self.end_to_end, self.image_input = runner_io(meta)
        TorchRunner.__init__(self, torch.jit.optimize_for_inference(module), meta.get("model"), threads)
        self.path = Path(path)
        size = meta.get("input_size")
        self.input_size = tuple(size) if size else None


    def __call__(self, x):
        if not self.end_to_end:
            return super().__call__(x)
        feed = torch.from_numpy(image_from_tensor(x) if self.image_input else x)
        with torch.inference_mode():
            outs = [t.numpy() for t in self.module(feed)]
        return detections_from_outputs(dict(zip(("boxes", "scores", "landmarks", "count"), outs)))


def _export(model, name, out, opts):
    net, x, meta = for_export(model, opts)
    return export_torchscript(net, name, out, opts.input_size, opts.dcn, x, meta)


FORMAT = Format(
    name="torchscript", runs_on="PyTorch CPU", packages=("torch",), description="TorchScript, traced and frozen; loads with plain torch.jit.load",
    suffixes=(".pt", ".torchscript"), runner=lambda path, threads=None: TorchScriptRunner(path, threads),
    export=_export, dcn_forms=("grid", "gather"), nms=True, image_input=True, rules=(image_input_needs_nms,))
