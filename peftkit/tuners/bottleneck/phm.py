"""Compacter (Karimi Mahabadi et al. 2021): a bottleneck adapter whose projections are PHM layers.

    rule = new_rule(phm_dim)                       A_1..A_n, one (n, n, n) Parameter that every
                                                   layer of one adapter shares
    PHMLinear(in_dim, out_dim, phm_dim, phm_rank)  forward(x, rule) = x W^T + b,
                                                   W = sum_i A_i ⊗ B_i with B_i = s_i t_i^T (rank phm_rank)
    Compacter(in_dim, out_dim, size, rule, phm_rank, non_linearity, dropout)
        up(act(down(x))): an adapter's contribution, with Bottleneck's interface (parallel, scaling)
    check_widths(phm_dim, widths)                  PeftkitError naming a width phm_dim does not divide

The rule is registered in every site's Compacter, so named_parameters() lists it once and its
gradient sums every layer's; model.adapter_state_dict saves it once under SHARED's key.
"""
import math

import torch
from torch import nn

from ...errors import PeftkitError
from .layer import ACTIVATIONS

SHARED = ("phm_rule",)  # tensors one adapter shares across its sites: saved once, keyed without a site


def new_rule(phm_dim: int) -> nn.Parameter:
    # U(-1, 1), AdapterHub's "uniform" rule init, rather than its default N(0, 1e-4): with the up
    # projection at zero, rules that small leave every gradient at ~1e-10, below Adam's epsilon.
    # At U(-1, 1) the down projection's weights come out at nn.Linear's scale.
    return nn.Parameter(torch.empty(phm_dim, phm_dim, phm_dim, dtype=torch.float32).uniform_(-1.0, 1.0))


class PHMLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, phm_dim: int, phm_rank: int):
        super().__init__()
        self.in_features, self.out_features, self.phm_dim = in_dim, out_dim, phm_dim
        n = phm_dim
        self.s = nn.Parameter(torch.empty(n, in_dim // n, phm_rank, dtype=torch.float32))
        self.t = nn.Parameter(torch.empty(n, phm_rank, out_dim // n, dtype=torch.float32))  # t_i^T, stacked
        self.bias = nn.Parameter(torch.zeros(out_dim, dtype=torch.float32))
        for i in range(n):  # glorot-uniform per factor, AdapterHub's hypercomplex_nonlinearity default
            nn.init.xavier_uniform_(self.s.data[i])
            nn.init.xavier_uniform_(self.t.data[i])

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """W, as nn.Linear holds it (out x in): W[b*q + j, a*p + i] = sum_k A_k[a, b] B_k[i, j]."""
        blocks = torch.bmm(self.s, self.t)  # B_k: (n, in/n, out/n)
        w = torch.einsum("kab,kij->bjai", rule, blocks)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x, rule):
        return nn.functional.linear(x, self.weight(rule.to(x.device)), self.bias)


class Compacter(nn.Module):
    def __init__(self, in_dim, out_dim, size, rule: nn.Parameter, phm_rank=1, non_linearity="gelu", dropout=0.0):
        super().__init__()
        n = rule.shape[0]
        self.phm_rule = rule  # the same Parameter in every site's adapter (see the module docstring)
        self.down = PHMLinear(in_dim, size, n, phm_rank)
        self.act = ACTIVATIONS[non_linearity]()
        self.drop = nn.Dropout(dropout)
        self.up = PHMLinear(size, out_dim, n, phm_rank)
        # t of the up projection at zero makes every B_i, so W and the adapter's output, exactly 0:
        # step 0 is the base model. Its gradient (through A_i and s_i, both nonzero) is not.
        nn.init.zeros_(self.up.t)
        self.parallel = False  # reads the wrapped output, as Houlsby and Pfeiffer adapters do
        self.scaling = 1.0

    def forward(self, x):
        return self.up(self.drop(self.act(self.down(x, self.phm_rule))), self.phm_rule)


def check_widths(phm_dim: int, widths: dict[str, int]) -> None:
    """Refuse a phm_dim that does not divide the width of every adapted module ({name: width})."""
    for name, width in widths.items():
        if width % phm_dim:
            common = math.gcd(*widths.values())
            valid = [d for d in range(1, common + 1) if common % d == 0]
            raise PeftkitError(f"compacter phm_dim {phm_dim} does not divide the width {width} of {name}; "
                               f"phm_dim values that divide every adapted width here: {', '.join(map(str, valid))}")
