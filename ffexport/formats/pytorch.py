"""The reference: the PyTorch model itself (format "torch"). Every artifact is compared against it."""
from ..runner import Runner
from .base import Format


class TorchRunner(Runner):
    kind = "pytorch"

    def __init__(self, module, model=None, threads=None):
        import torch

        self.module, self.model = module, model
        if threads:
            torch.set_num_threads(threads)

    def __call__(self, x):
        import torch

        with torch.inference_mode():
            return tuple(t.numpy() for t in self.module(torch.from_numpy(x)))


# The reference has no file of its own: a .pth checkpoint is loaded by `ffexport.runtime.load_runner`.
FORMAT = Format(name="torch", description="PyTorch eager (the reference every artifact is compared with)",
                suffixes=(".pth",), export=None, runner=None, dcn_forms=("grid", "gather", "rows", "plain"))
