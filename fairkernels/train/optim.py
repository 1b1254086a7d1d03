"""Fused Adam and SGD whose step goes straight to torch's fused kernel.

torch.optim's step() is a Python wrapper around one fused call: hooks, a profiler range,
per-parameter state lookups and grouping by device and dtype. For DFC's narrow encoder that
wrapper measured 240-350 us of a 390-510 us step on the 2-core CPU, against 154 us for the
kernel itself, more than a fifth of the encoder's own forward and backward. These subclasses
keep torch's optimizers (state_dict, checkpoints, schedulers and hooks behave as before) and
replace only the common case, every parameter of a group with a dense gradient and its state
already built, by the kernel call with the same arguments torch's own fused path passes.
Anything else (the first step, which builds the state; a closure; registered step hooks; a
tensor learning rate) runs torch's step, wrapped as torch wraps it. The fast path skips only
the profiler range "Optimizer.step#...", which alone cost about 100 us a step.
"""
from __future__ import annotations

import torch
from torch.optim import optimizer as _optimizer


def fusable(params) -> bool:
    """torch's fused optimizer steps take CPU/CUDA float32/float64 parameters."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                                for p in params)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused where torch has it for these tensors: the per-parameter Python loop of the
    default CPU path costs as much as the model's own step for fair clustering's small
    autoencoders."""
    params = list(params)
    return LeanAdam(params, lr=lr, fused=fusable(params))


def sgd(params, lr: float, momentum: float) -> torch.optim.SGD:
    """SGD with momentum, fused where torch has it for these tensors."""
    params = list(params)
    return LeanSGD(params, lr=lr, momentum=momentum, fused=fusable(params))


def _torch_step(cls):
    """torch's step of optimizer class cls inside its hook-and-profiler wrapper, once: torch
    patches a class's step the first time one of its instances is built (Optimizer.__init__)."""
    step = cls.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    return torch.optim.Optimizer.profile_hook_step(step)


def _hooks_registered(opt: torch.optim.Optimizer) -> bool:
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or
                _optimizer._global_optimizer_pre_hooks or _optimizer._global_optimizer_post_hooks)


def _dense_grads(group, state, key: str):
    """(params, grads, their state[key]) of a group when every parameter has a dense gradient
    on one device and dtype and its state is built, else None (torch's step then runs)."""
    params = group["params"]
    grads = [p.grad for p in params]
    if any(g is None or g.is_sparse for g in grads):
        return None
    first = params[0]
    if any(p.device != first.device or p.dtype != first.dtype for p in params):
        return None
    buffers = [state[p].get(key) for p in params]
    if any(b is None for b in buffers):
        return None
    return params, grads, buffers


class _DirectStep:
    """step(): the subclass's _fused_step on every group when _fast accepts them all, else
    torch's own step (wrapped as torch wraps it). Mixed in before the torch optimizer class."""
    _torch_base = None      # the torch optimizer class
    _torch_step = None      # its wrapped step, built on first use

    @torch.no_grad()
    def step(self, closure=None):
        groups = [group for group in self.param_groups if group["params"]]
        fast = None if closure is not None or _hooks_registered(self) else [self._fast(group) for group in groups]
        if fast is None or not all(fast):
            cls = type(self)
            if cls._torch_step is None:
                cls._torch_step = _torch_step(cls._torch_base)
            return cls._torch_step(self, closure)
        for group, (params, grads, buffers) in zip(groups, fast):
            self._fused_step(group, params, grads, buffers)
        return None

    # Not wrapped by Optimizer.__init__'s profiler patch (it skips a step marked hooked).
    step.hooked = True


class LeanSGD(_DirectStep, torch.optim.SGD):
    _torch_base = torch.optim.SGD

    def _fused_step(self, group, params, grads, buffers):
        torch._fused_sgd_(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                          lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                          maximize=group["maximize"], is_first_step=False, grad_scale=None, found_inf=None)

    def _fast(self, group):
        if not group.get("fused") or group.get("differentiable") or isinstance(group["lr"], torch.Tensor) or \
                group["momentum"] == 0:
            return None
        return _dense_grads(group, self.state, "momentum_buffer")


class LeanAdam(_DirectStep, torch.optim.Adam):
    _torch_base = torch.optim.Adam

    def _fused_step(self, group, params, grads, exp_avgs):
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
        beta1, beta2 = group["betas"]
        kernel(params, grads, exp_avgs, [s["exp_avg_sq"] for s in states],
               [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps,
               amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2,
               weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
               grad_scale=None, found_inf=None)

    def _fast(self, group):
        if not group.get("fused") or group.get("differentiable") or group.get("capturable") or \
                isinstance(group["lr"], torch.Tensor) or isinstance(group["betas"][0], torch.Tensor):
            return None
        return _dense_grads(group, self.state, "exp_avg")
