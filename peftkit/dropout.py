"""Dropout at half the cost of PyTorch's on a CPU: a quarter of the random draws.

    swap_in_fast_dropout(model)   # every nn.Dropout of the model, for CPU training

PyTorch's CPU dropout draws one Bernoulli sample per element from its Mersenne
Twister, which made the dropouts a large share of a MiniLM LoRA step once bf16
made the matmuls fast (benchmarks/results/cpu-kernels-cpu.md times both). No
library offers a cheaper CPU dropout, hence this one: it draws 64 random bits at a
time from the same seeded generator and cuts them into four 16-bit uniforms, and
keeps an element when its uniform is at or above round(p * 65536) / 65536, within
1e-5 of p. The elements stay independent, the kept ones are scaled by 1 / (1 - p)
as usual, and `torch.manual_seed` reproduces the masks. Evaluation is untouched
(dropout is the identity there), and so are CUDA tensors, whose dropout is cheap.
"""
import torch
from torch import nn

LEVELS = 1 << 16  # the resolution of each uniform draw


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return _Masked.apply(x, keep_mask(x, self.p), 1.0 / (1.0 - self.p))


class _Masked(torch.autograd.Function):
    """x * keep * scale, keeping only the boolean mask for backward (one byte an element, as
    PyTorch's own dropout keeps), not a mask in x's dtype. The scale applies as a float after
    the mask: 1 / 0.9 rounded to bf16 first would be 0.2% off."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean tensor of x's shape: True where an element is kept, False (probability p) where dropped."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # full 64-bit range
    uniform = bits.view(torch.int16)[:n].view(x.shape)  # four independent uniforms in [-32768, 32767]
    threshold = -LEVELS // 2 + round(p * LEVELS)
    return uniform >= threshold


def swap_in_fast_dropout(model) -> int:
    """Replace every plain nn.Dropout in `model` by a FastDropout of the same p; returns how many."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped
