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


def sgd(params, lr: float, momentum: float, flat: bool = False) -> torch.optim.SGD:
    """SGD with momentum, fused where torch has it for these tensors. flat: see LeanSGD."""
    params = list(params)
    return LeanSGD(params, lr=lr, momentum=momentum, fused=fusable(params), flat=flat)


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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad without its profiler range (about as long as a narrow model's
        elementwise work)."""
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        return None


class _FlatBuffers:
    """One flat buffer each for a list of parameters, their gradients and their momentum buffers,
    every tensor of the list a view of its slice: one fused call then updates all of them.

    Why: on a narrow model the fused SGD over 9 separate tensors took 0.20-0.24 ms a step in the
    training loop, against 0.11-0.12 ms over one flat tensor (2-core CPU, DFC width 0.25); the
    elementwise update is the same, so the result is bitwise the same."""

    def __init__(self, params):
        first = params[0]
        sizes = [p.numel() for p in params]
        self.params = params
        self.flat = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.flat)
        self.momentum = None
        self.momentum_views = None
        self.param_views = list(self.flat.split(sizes))
        self.grad_views = [view.view_as(p) for view, p in zip(self.grad.split(sizes), params)]
        self.sizes = sizes
        with torch.no_grad():
            for p, view in zip(params, self.param_views):
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
        self.param_ptrs = [p.data_ptr() for p in params]
        self.attach_grads()

    def attach_grads(self) -> None:
        for p, view in zip(self.params, self.grad_views):
            p.grad = view

    def holds(self, tensors, base) -> bool:
        """Whether tensors are still base's slices, in order (nothing rebound them)."""
        start = base.data_ptr()
        step = base.element_size()
        offset = 0
        for tensor, size in zip(tensors, self.sizes):
            if tensor is None or tensor.data_ptr() != start + offset * step:
                return False
            offset += size
        return True

    def momentum_of(self, state):
        """The flat momentum buffer, after moving the per-parameter buffers torch's first step
        (or a loaded state_dict) made into it; None while any is missing."""
        buffers = [state[p].get("momentum_buffer") for p in self.params]
        if any(b is None for b in buffers):
            return None
        if self.momentum is None or not self.holds(buffers, self.momentum):
            self.momentum = torch.cat([b.detach().reshape(-1) for b in buffers])
            self.momentum_views = [view.view_as(p) for p, view in zip(self.params, self.momentum.split(self.sizes))]
            for p, view in zip(self.params, self.momentum_views):
                state[p]["momentum_buffer"] = view
        return self.momentum

    def grads_attached(self) -> bool:
        return all(p.grad is view for p, view in zip(self.params, self.grad_views))

    def bound(self, state) -> bool:
        """Whether every parameter, gradient and momentum buffer is still the view this object
        made: the same check as holds() on all three, by identity and stored pointers, which is
        about a third of its cost (a narrow model's step runs it every time)."""
        views = self.momentum_views
        return views is not None and [p.data_ptr() for p in self.params] == self.param_ptrs and \
            self.grads_attached() and all(state[p].get("momentum_buffer") is view
                                          for p, view in zip(self.params, views))


class LeanSGD(_DirectStep, torch.optim.SGD):
    """flat=True (one parameter group, one dtype and device, not under DDP): the parameters, their
    gradients and momentum buffers become views of three flat buffers (_FlatBuffers; p.data is
    rebound once, here), and zero_grad() zeroes the flat gradient instead of setting None, so
    autograd accumulates into it. A parameter that got no gradient in a step then still takes
    the momentum part of its update, so use it where every parameter gets one every step (the
    DFC clustering phase). Anything that rebinds them only costs the flat path: torch's fused
    step runs instead."""
    _torch_base = torch.optim.SGD

    def __init__(self, params, *args, flat: bool = False, **kwargs):
        params = list(params)
        super().__init__(params, *args, **kwargs)
        self._flat = None
        if flat and len(self.param_groups) == 1 and fusable(params) and \
                len({(p.dtype, p.device) for p in params}) == 1:
            self._flat = _FlatBuffers(self.param_groups[0]["params"])

    def step(self, closure=None):
        # The flat path's every-step case first, with the cheapest checks that keep its
        # conditions (one group, its parameter list, no hooks or closure, the fused flags, the
        # views all in place): the generic path's checks cost a narrow DFC step 15-20 us warm
        # and 50-80 us in the training loop (2-core VM), about as long as the update itself.
        flat = self._flat
        if flat is not None and closure is None and len(self.param_groups) == 1:
            group = self.param_groups[0]
            if group["params"] is flat.params and self._flags_fast(group) and not _hooks_registered(self) and \
                    flat.bound(self.state):
                # No torch.no_grad(): the three flat tensors do not require grad, so nothing is recorded.
                self._fused_step(group, [flat.flat], [flat.grad], [flat.momentum])
                return None
        return super().step(closure)

    step.hooked = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._flat is None:
            return super().zero_grad(set_to_none)
        self._flat.grad.zero_()
        if not self._flat.grads_attached():
            self._flat.attach_grads()

    def _fused_step(self, group, params, grads, buffers):
        torch._fused_sgd_(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                          lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                          maximize=group["maximize"], is_first_step=False, grad_scale=None, found_inf=None)

    def loop_steps(self):
        """(zero_grad, step) for one pass of a training loop (see loop_steps below)."""
        if self._flat is None:
            return self.zero_grad, self.step
        loop = _FlatLoop(self)
        return loop.zero_grad, loop.step

    @staticmethod
    def _flags_fast(group) -> bool:
        return bool(group.get("fused")) and not group.get("differentiable") and \
            not isinstance(group["lr"], torch.Tensor) and group["momentum"] != 0

    def _fast(self, group):
        if not self._flags_fast(group):
            return None
        flat = self._flat
        if flat is not None and flat.holds(group["params"], flat.flat) and \
                flat.holds([p.grad for p in group["params"]], flat.grad):
            momentum = flat.momentum_of(self.state)
            if momentum is not None:
                return [flat.flat], [flat.grad], [momentum]
        return _dense_grads(group, self.state, "momentum_buffer")


def loop_steps(optimizer):
    """(zero_grad, step): what a training loop calls every step for one pass over its batches
    (an epoch), in place of optimizer.zero_grad and optimizer.step.

    The caller promises that until it stops using them nothing but its own backward and these
    two touches the optimizer's parameters, their gradients and its state (no rebinding, no
    load_state_dict, no hook registered midway): the epoch loop of a Trainer, which owns its
    model and optimizer. The flat LeanSGD then checks its views once, at the first step that
    can take its flat update, and afterwards calls the fused kernel and zeroes the flat
    gradient directly: the per-step checks (about 10 Python-level reads of each parameter)
    cost 5-6 us a step warm and several times that between a narrow model's ops. Any other
    optimizer gets its own zero_grad and step."""
    if isinstance(optimizer, LeanSGD):
        return optimizer.loop_steps()
    return optimizer.zero_grad, optimizer.step


class _FlatLoop:
    """LeanSGD.loop_steps with flat buffers: its own step() (checks included) until the flat
    path's conditions hold, then the kernel on the flat buffers with the group's settings of that
    moment (lr read every step, so a scheduler that changes it between steps is followed)."""

    def __init__(self, optimizer: LeanSGD):
        self.optimizer = optimizer
        self.kernel_args = None       # (params, grads, momentum) lists once bound

    def zero_grad(self) -> None:
        if self.kernel_args is None:
            return self.optimizer.zero_grad()
        self.kernel_args[1][0].zero_()      # the views stay attached: autograd adds into them in place
        return None

    def step(self) -> None:
        optimizer = self.optimizer
        if self.kernel_args is None:
            optimizer.step()
            flat = optimizer._flat
            if len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["params"] is flat.params and \
                    optimizer._flags_fast(optimizer.param_groups[0]) and not _hooks_registered(optimizer) and \
                    flat.bound(optimizer.state):
                self.group = optimizer.param_groups[0]
                self.kernel_args = ([flat.flat], [flat.grad], [flat.momentum])
            return None
        group = self.group
        params, grads, momentum = self.kernel_args
        torch._fused_sgd_(params, grads, momentum, weight_decay=group["weight_decay"], momentum=group["momentum"],
                          lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                          maximize=group["maximize"], is_first_step=False, grad_scale=None, found_inf=None)
        return None


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
