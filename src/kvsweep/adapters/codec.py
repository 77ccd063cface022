"""What the latent-cache decoder reads of a codec's linear maps: ``GroupLinear``, a block-diagonal linear map.

A low-rank codec over groups of heads (Palu's G-LRD; per head and all heads jointly as its extreme cases)
compresses each group's slice of K or V on its own: ``G`` blocks, each ``in_features -> out_features``,
on the consecutive slices of the last dimension. The decoder (``kvsweep.latent``) recognises it (as it
recognises a plain ``nn.Linear``, the one-group case) to attend over each group's code and to fold the maps
into ``dense`` and ``query_key_value``.
"""

from __future__ import annotations

import math

import torch


class GroupLinear(torch.nn.Module):
    """``x (..., G * in) -> (..., G * out)``: block g maps slice g of x by ``weight[g]`` (out, in) plus ``bias[g]``.

    Parameters: ``weight`` (G, out, in), ``bias`` (G, out) (or None). Initialised as ``nn.Linear`` does per
    block (uniform in +-1/sqrt(in)).
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.weight = torch.nn.Parameter(torch.empty(groups, out_features, in_features).uniform_(-bound, bound))
        self.bias = torch.nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xg = x.reshape(*lead, self.groups, self.in_features)  # (..., G, in)
        y = torch.einsum("...gi,goi->...go", xg, self.weight)  # (..., G, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.groups * self.out_features)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def group_blocks(lin: torch.nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A linear map as blocks: weight (G, out, in) and bias (G * out,) or None; an ``nn.Linear`` is one block; None for
    anything else (a map that is not linear)."""
    if isinstance(lin, GroupLinear):
        return lin.weight, (lin.bias.reshape(-1) if lin.bias is not None else None)
    if isinstance(lin, torch.nn.Linear):
        return lin.weight.unsqueeze(0), lin.bias
    return None
