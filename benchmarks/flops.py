"""FLOP counting and this CPU's practical peak, for the FLOP-bound limit in benchmarks/RESULTS.md."""
import time


def model_flops(model, size) -> float:
    """FLOPs (2 x multiply-accumulates) of convolutions and the DCN's column MatMul for one input.

    Elementwise work (activations, bilinear sampling, fusion weights) is left out: it is memory-bound
    and small next to the convolutions, which is also how the FeatherFace papers count.
    """
    import torch

    from ffexport.models.dcn import DeformableConv2d

    macs = [0]

    def conv_hook(m, inp, out):
        macs[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def dcn_hook(m, inp, out):
        macs[0] += out.numel() * m.regular_conv.in_channels * 9  # the sampled-column MatMul

    hooks = []
    for mod in model.modules():
        if isinstance(mod, DeformableConv2d):
            hooks.append(mod.register_forward_hook(dcn_hook))
        elif isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, *size))
    for h in hooks:
        h.remove()
    return 2.0 * macs[0]


def peak_gflops(threads, n=2048, repeats=5) -> float:
    """This CPU's practical fp32 peak: a large SGEMM in PyTorch (MKL/oneDNN) at `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
