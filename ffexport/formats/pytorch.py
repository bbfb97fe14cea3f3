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


def checkpoint_runner(path, threads=None, model=None, dcn="grid") -> TorchRunner:
    """The reference for model `model` (its weights resolved by name unless `path` is given), or for a .pth
    checkpoint given as an artifact (model None: V1 or V2, told from its keys)."""
    from ..weights import load_model

    net = load_model(model, path, dcn=dcn)
    return TorchRunner(net, net.name, threads)


FORMAT = Format(name="torch", runs_on="PyTorch CPU", packages=("torch",), description="PyTorch eager (the reference every artifact is compared with)",
                suffixes=(".pth",), export=None, runner=checkpoint_runner, reference=True,
                dcn_forms=("grid", "gather", "rows", "plain"))
