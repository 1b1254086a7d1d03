"""Layers whose weights depend on the row's protected group (FCMI's multi-branch decoder).

GroupLinear routes in one of two ways. On a GPU with a few groups (T <= DENSE_MAX_GROUPS) it
runs one dense matmul against the T branches' weights laid side by side and gathers each row's
own branch: no Python loop over groups, no per-row weight copies (an [N, in, out] gather would
cost N times the weights) and no host sync, at T times the FLOPs of one branch (FLOPs are cheap
there, syncs are not). On the CPU, or with more groups (HAR has 30 subjects), T times the FLOPs
would dominate the model, so it sorts the rows by group and runs one matmul per group on that
group's rows (1x the FLOPs, T small GEMMs, one host read of the group counts). GroupBatchNorm1d normalises every row with the batch statistics of its
own group (per-group running statistics in eval mode), as a separate BatchNorm1d in each
branch of the paper's group-wise decoder does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# On a GPU, up to this many groups GroupLinear computes every branch for every row (see above).
DENSE_MAX_GROUPS = 4


def _check_group_rows(groups: torch.Tensor, num_rows: int) -> None:
    if groups.dim() != 1 or groups.shape[0] != num_rows:
        raise ValueError(f"groups must be a vector of length {num_rows}, got shape {tuple(groups.shape)}")


def group_order(groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, list]:
    """(the row permutation that sorts rows by group, the T group sizes as ints): the routing of
    GroupLinear's sorted path; the sizes are one host read."""
    groups = groups.long()
    return torch.argsort(groups, stable=True), torch.bincount(groups, minlength=num_groups).tolist()


class GroupLinear(nn.Module):
    """y_i = x_i W[g_i] + b[g_i] with W of shape [T, in, out] (one Linear per group)."""

    def __init__(self, in_features: int, out_features: int, num_groups: int, routing: str = "auto"):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if routing not in ("auto", "dense", "sorted"):
            raise ValueError(f"routing must be 'auto', 'dense' or 'sorted', got {routing!r}")
        self.in_features, self.out_features, self.num_groups = in_features, out_features, num_groups
        self.routing = routing
        self.weight = nn.Parameter(torch.empty(num_groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_groups, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear, drawn independently for every branch.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def uses_sorted_rows(self, x: torch.Tensor) -> bool:
        return self.routing == "sorted" or (self.routing == "auto" and self.num_groups > 1 and (
            not x.is_cuda or self.num_groups > DENSE_MAX_GROUPS))

    def forward(self, x: torch.Tensor, groups: torch.Tensor, rows_by_group=None) -> torch.Tensor:
        """rows_by_group: group_order(groups, T) when the caller routes several layers by the
        same groups (computed once instead of once per layer; used by the sorted routing)."""
        _check_group_rows(groups, x.shape[0])
        if self.uses_sorted_rows(x):
            order, counts = rows_by_group or group_order(groups, self.num_groups)
            return self._forward_sorted(x, order, counts)
        # [in, T*out]: every branch's output for every row in one GEMM, then keep row i's branch.
        weight_cat = self.weight.permute(1, 0, 2).reshape(self.in_features, -1)
        all_branches = torch.addmm(self.bias.reshape(-1), x, weight_cat)
        all_branches = all_branches.view(x.shape[0], self.num_groups, self.out_features)
        index = groups.long().view(-1, 1, 1).expand(-1, 1, self.out_features)
        return all_branches.gather(1, index).squeeze(1)

    def _forward_sorted(self, x: torch.Tensor, order: torch.Tensor, counts: list) -> torch.Tensor:
        pieces = []
        for group, rows in enumerate(torch.split(x.index_select(0, order), counts)):
            if rows.shape[0]:
                pieces.append(torch.addmm(self.bias[group], rows, self.weight[group]))
        out_sorted = torch.cat(pieces) if pieces else x.new_empty(0, self.out_features)
        return torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_groups={self.num_groups}"


class GroupBatchNorm1d(nn.Module):
    """BatchNorm1d with separate statistics and affine parameters per group: in training a row
    is normalised by the mean and (biased) variance of its group's rows in the batch, and the
    per-group running statistics are updated; in eval mode the running statistics are used. A
    group with no row in the batch keeps its running statistics. No Python loop over groups."""

    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_features, self.num_groups, self.eps, self.momentum = num_features, num_groups, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_groups, num_features))
        self.bias = nn.Parameter(torch.zeros(num_groups, num_features))
        self.register_buffer("running_mean", torch.zeros(num_groups, num_features))
        self.register_buffer("running_var", torch.ones(num_groups, num_features))
        # Set by fairkernels.train.sync_batchnorm.convert_batch_norm under DDP: the per-group
        # sums are then all-reduced, so the statistics are those of the global batch.
        self.process_group = None

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.process_group is None:
            return tensor
        from fairkernels.train.sync_batchnorm import sum_over_ranks
        return sum_over_ranks(tensor, self.process_group)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        _check_group_rows(groups, x.shape[0])
        groups = groups.long()
        if self.training:
            counts = self._sum(torch.zeros(self.num_groups, dtype=x.dtype, device=x.device).index_add_(
                0, groups, torch.ones_like(groups, dtype=x.dtype))).detach()
            safe = counts.clamp_min(1.0).unsqueeze(1)
            mean = self._sum(x.new_zeros(self.num_groups, self.num_features).index_add(0, groups, x)) / safe
            centred = x - mean.index_select(0, groups)
            var = self._sum(x.new_zeros(self.num_groups, self.num_features).index_add(
                0, groups, centred * centred)) / safe
            with torch.no_grad():
                present = (counts > 0).unsqueeze(1)
                unbiased = var * (counts / (counts - 1).clamp_min(1.0)).unsqueeze(1)
                update = lambda old, new: torch.where(present, (1 - self.momentum) * old + self.momentum * new, old)  # noqa: E731
                self.running_mean.copy_(update(self.running_mean, mean))
                self.running_var.copy_(update(self.running_var, unbiased))
            scale = torch.rsqrt(var + self.eps)
        else:
            mean, scale = self.running_mean, torch.rsqrt(self.running_var + self.eps)
            centred = x - mean.index_select(0, groups)
        return centred * (scale * self.weight).index_select(0, groups) + self.bias.index_select(0, groups)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, num_groups={self.num_groups}, eps={self.eps}"


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
