"""Layers whose weights depend on the row's protected group (FCMI's multi-branch decoder).

Routing is one dense matmul against the T branches' weights laid side by side, followed by a
gather of each row's own branch: no Python loop over groups, no per-row weight copies
(an [N, in, out] gather would cost N times the weights), and no host sync for group counts.
The price is T times the FLOPs of a single branch, which is small for the few protected groups
fair clustering deals with (2 to ~30) next to the encoder's cost.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _check_group_rows(groups: torch.Tensor, num_rows: int) -> None:
    if groups.dim() != 1 or groups.shape[0] != num_rows:
        raise ValueError(f"groups must be a vector of length {num_rows}, got shape {tuple(groups.shape)}")


class GroupLinear(nn.Module):
    """y_i = x_i W[g_i] + b[g_i] with W of shape [T, in, out] (one Linear per group)."""

    def __init__(self, in_features: int, out_features: int, num_groups: int):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.in_features, self.out_features, self.num_groups = in_features, out_features, num_groups
        self.weight = nn.Parameter(torch.empty(num_groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_groups, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear, drawn independently for every branch.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        _check_group_rows(groups, x.shape[0])
        # [in, T*out]: every branch's output for every row in one GEMM, then keep row i's branch.
        weight_cat = self.weight.permute(1, 0, 2).reshape(self.in_features, -1)
        all_branches = torch.addmm(self.bias.reshape(-1), x, weight_cat)
        all_branches = all_branches.view(x.shape[0], self.num_groups, self.out_features)
        index = groups.long().view(-1, 1, 1).expand(-1, 1, self.out_features)
        return all_branches.gather(1, index).squeeze(1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_groups={self.num_groups}"


class GroupConvTranspose2d(nn.Module):
    """A ConvTranspose2d per group: one transposed convolution with T * out_channels outputs,
    then each row keeps its group's channel block (same routing idea as GroupLinear)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, output_padding: int = 0):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.out_channels, self.num_groups = out_channels, num_groups
        self.conv = nn.ConvTranspose2d(in_channels, out_channels * num_groups, kernel_size, stride=stride,
                                       padding=padding, output_padding=output_padding)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        _check_group_rows(groups, x.shape[0])
        out = self.conv(x)
        n, _, height, width = out.shape
        out = out.view(n, self.num_groups, self.out_channels, height, width)
        index = groups.long().view(-1, 1, 1, 1, 1).expand(-1, 1, self.out_channels, height, width)
        return out.gather(1, index).squeeze(1)
