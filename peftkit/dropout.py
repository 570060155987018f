"""Dropout at a fraction of the cost of PyTorch's on a CPU.

    swap_in_fast_dropout(model)   # every nn.Dropout of the model, for CPU training

PyTorch's CPU dropout draws one Bernoulli sample per element from its Mersenne
Twister (Intel CPUs get MKL's generator; others do not), and multiplying a bf16
tensor by a boolean mask converts the mask element by element, unvectorized. Once
bf16 made the matmuls fast, the 26 dropouts of a MiniLM LoRA step cost a fifth of
it (benchmarks/results/cpu-kernels-cpu.md times both). No library offers a cheaper
CPU dropout, hence this one:
- it draws 64 random bits at a time from the same seeded generator and cuts them
  into four 16-bit integers, of which 15 bits make a uniform draw; an element is kept
  when its draw is at or above round(p * 32768), so the drop rate is within 2e-5 of p;
- the mask is built in x's own dtype (exact 0 and 1) with vectorized integer
  operations that write the bit pattern of 1.0 directly, so the multiplies stay in
  one dtype.
The elements stay independent, kept ones are scaled by 1 / (1 - p) as usual, and
`torch.manual_seed` reproduces the masks. Evaluation is untouched (dropout is the
identity there), and so are CUDA tensors, whose dropout is cheap.
"""
import torch
from torch import nn

LEVELS = 1 << 15  # the resolution of each uniform draw
# Per float type: the integer type of the same width its mask is built in, and the bit pattern of 1.0 there
SAME_WIDTH_INT = {dtype: (ints, torch.ones((), dtype=dtype).view(ints).item())
                  for dtype, ints in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16),
                                      (torch.float32, torch.int32), (torch.float64, torch.int64))}


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile (train.compile) inductor fuses PyTorch's own dropout into the neighbouring
        # kernels with a cheap generator of its own; the mask's reinterpreting views below do not trace.
        if (not self.training or self.p == 0.0 or x.device.type != "cpu"
                or x.dtype not in SAME_WIDTH_INT or torch.compiler.is_compiling()):
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return _Masked.apply(x, keep_mask(x, self.p), 1.0 / (1.0 - self.p))


class _Masked(torch.autograd.Function):
    """x * keep * scale. The scale applies as a float after the mask: 1 / 0.9 rounded to bf16
    first would be 0.2% off."""

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
    """A tensor of x's shape and dtype: 1.0 where an element is kept, 0.0 (probability p) where dropped."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # full 64-bit range
    draws = bits.view(torch.int16)[:n].view(x.shape)  # four independent 16-bit integers per draw
    int_type, one = SAME_WIDTH_INT[x.dtype]
    uniform = draws.to(int_type) if int_type != torch.int16 else draws
    uniform &= LEVELS - 1  # 15 bits: [0, 32767], so subtracting the threshold cannot overflow
    uniform -= round(p * LEVELS)
    uniform >>= uniform.element_size() * 8 - 1  # the sign: -1 (all bits set) where dropped, 0 where kept
    uniform.bitwise_not_()  # all bits set where kept, 0 where dropped
    uniform &= one
    return uniform.view(x.dtype)


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
