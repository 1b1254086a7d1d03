"""BatchNorm with the statistics of the global batch, on any device (gloo on CPU included).

torch.nn.SyncBatchNorm only runs on accelerators; this one all-reduces, with autograd (a sum
forward, a sum of the incoming gradients backward), the per-channel sums and then the centred
sums of squares, so the normalised output, the running statistics and the gradients equal those of nn.BatchNorm on the
concatenated batch of every rank, up to float rounding. Two passes (mean first) keep the
variance accurate in float32, where E[x^2] - E[x]^2 cancels.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x (on every rank). Each rank's loss sees y, so the gradient of the
    sum of the ranks' losses w.r.t. x is the sum over ranks of their dL/dy: an all-reduce."""

    @staticmethod
    def forward(ctx, tensor, group):
        import torch.distributed as dist
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """The sum over ranks of `tensor`, differentiable (process_group True: the default group)."""
    return _SumOverRanks.apply(tensor, None if process_group is True else process_group)


class GlobalBatchNorm(_BatchNorm):
    """nn.BatchNorm1d/2d/3d semantics with the batch statistics taken over every rank's rows."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_count = input.numel() // input.shape[1]
        stats = torch.cat([input.sum(dims), input.new_full((1,), float(local_count))])
        stats = sum_over_ranks(stats, self.process_group)
        count = stats[-1].detach()
        mean = stats[:-1] / count
        centered = input - mean.view(shape)
        var = sum_over_ranks((centered * centered).sum(dims), self.process_group) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(count))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        # nn.BatchNorm's rule: momentum None is a cumulative average; running_var is unbiased.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_batch_norm(module: nn.Module, process_group=True) -> nn.Module:
    """`module` with every nn.BatchNorm* replaced by a GlobalBatchNorm holding the same
    parameters and buffers (same state_dict keys), like nn.SyncBatchNorm.convert_sync_batchnorm,
    and every GroupBatchNorm1d set to all-reduce its per-group statistics."""
    from fairkernels.models.grouped import GroupBatchNorm1d
    if isinstance(module, GroupBatchNorm1d):
        module.process_group = process_group
        return module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        replaced = convert_batch_norm(child, process_group)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
