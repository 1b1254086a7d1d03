"""The trainers' Adam and SGD (fairkernels/train/optim.py): the direct fused-kernel step gives
exactly torch's own step, state and checkpoints stay torch's, and every case the direct path does
not cover (first step, closure, hooks, missing gradients) runs torch's step."""
import copy

import pytest
import torch

from fairkernels.train.optim import LeanAdam, LeanSGD, adam, loop_steps, sgd

FUSED_CPU = True
try:
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, fused=True).step()
except RuntimeError:
    FUSED_CPU = False
pytestmark = pytest.mark.skipif(not FUSED_CPU, reason="this torch has no fused CPU optimizers")


def _params(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype)) for shape in ((7, 5), (5,), (3, 4))]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _reference(kind, params, **kwargs):
    cls = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
    return cls(params, fused=True, **kwargs)


def _lean(kind, params, **kwargs):
    cls = LeanSGD if kind == "sgd" else LeanAdam
    return cls(params, fused=True, **kwargs)


CASES = [
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("sgd", dict(lr=0.05, momentum=0.5, dampening=0.1, maximize=True)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-2, amsgrad=True)),
    ("adam", dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,kwargs", CASES)
def test_matches_torch_step_bitwise(kind, kwargs, dtype):
    want, got = _params(0, dtype), _params(0, dtype)
    reference, lean = _reference(kind, want, **kwargs), _lean(kind, got, **kwargs)
    for step in range(6):
        _set_grads(want, step)
        _set_grads(got, step)
        reference.step()
        lean.step()
        assert lean._fast(lean.param_groups[0]) is not None     # steps 2.. take the direct path
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    for a, b in zip(want, got):
        for key, value in reference.state[a].items():
            assert torch.equal(value, lean.state[b][key]), key


@pytest.mark.parametrize("kind,kwargs", [CASES[0], CASES[3]])
def test_state_dict_round_trip_continues_identically(kind, kwargs):
    """A checkpointed optimizer resumes where it was: same state_dict format as torch's."""
    params = _params(1)
    lean = _lean(kind, params, **kwargs)
    for step in range(3):
        _set_grads(params, step)
        lean.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(lean.state_dict())
    torch_state = _reference(kind, [torch.nn.Parameter(p.clone()) for p in saved_params], **kwargs).state_dict()
    assert saved_state.keys() == torch_state.keys()
    for step in range(3, 6):
        _set_grads(params, step)
        lean.step()
    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    again = _lean(kind, resumed, **kwargs)
    again.load_state_dict(saved_state)
    for step in range(3, 6):
        _set_grads(resumed, step)
        again.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,kwargs", [CASES[0], CASES[3]])
def test_torch_paths_still_run(kind, kwargs):
    """Closure, step hooks and a parameter without a gradient take torch's step (same result)."""
    want, got = _params(2), _params(2)
    reference, lean = _reference(kind, want, **kwargs), _lean(kind, got, **kwargs)
    calls = []
    lean.register_step_post_hook(lambda opt, args, kw: calls.append(1))
    for step in range(3):
        _set_grads(want, step)
        _set_grads(got, step)
        want[1].grad = got[1].grad = None           # a parameter outside this step's graph
        assert reference.step(lambda: torch.tensor(1.0)).item() == lean.step(lambda: torch.tensor(1.0)).item()
    assert calls == [1, 1, 1]
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_factories_pick_fused_only_for_supported_tensors():
    assert isinstance(sgd(_params(3), 0.1, 0.9), LeanSGD) and sgd(_params(3), 0.1, 0.9).param_groups[0]["fused"]
    assert adam(_params(3), 1e-3).param_groups[0]["fused"]
    half = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]
    assert not adam(half, 1e-3).param_groups[0]["fused"]
    opt = sgd(half, 0.1, 0.9)                       # torch's unfused step, through the same class
    half[0].grad = torch.ones(3, dtype=torch.float16)
    opt.step()
    assert torch.all(half[0] < 0)


def _backward(params, step):
    """Gradients by autograd (which accumulates into existing .grad tensors, as in training)."""
    gen = torch.Generator().manual_seed(200 + step)
    loss = sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum() + (p * p).sum() for p in params)
    loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [dict(lr=0.05, momentum=0.9),
                                    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)])
def test_flat_sgd_matches_torch_step(kwargs, dtype):
    """The same update as torch's fused SGD to rounding: torch's kernel computes the vectorised
    body and the scalar tail of each tensor differently (one fused multiply-add or two roundings),
    and the tails fall at other elements of one flat tensor."""
    want, got = _params(3, dtype), _params(3, dtype)
    reference, lean = _reference("sgd", want, **kwargs), LeanSGD(got, fused=True, flat=True, **kwargs)
    flat = lean._flat
    assert flat is not None and all(p.data_ptr() == v.data_ptr() for p, v in zip(got, flat.param_views))
    for step in range(6):
        reference.zero_grad()
        lean.zero_grad()
        assert all(p.grad is not None and not p.grad.any() for p in got)       # zeroed views, not None
        _backward(want, step)
        _backward(got, step)
        assert flat.holds([p.grad for p in got], flat.grad)                   # autograd wrote into the views
        reference.step()
        lean.step()
        if step > 0:                                                          # the first step builds the state
            assert lean._fast(lean.param_groups[0])[0][0] is flat.flat
            assert flat.bound(lean.state)                                     # step() took the flat path
        tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, **tol)
    for p, q in zip(got, want):
        torch.testing.assert_close(lean.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"], **tol)


def test_flat_sgd_resumes_from_a_state_dict_and_survives_rebinding():
    kwargs = dict(lr=0.05, momentum=0.9)
    straight, resumed = _params(4), _params(4)
    a = LeanSGD(straight, fused=True, flat=True, **kwargs)
    for step in range(3):
        a.zero_grad()
        _backward(straight, step)
        a.step()
    saved_params = [p.detach().clone() for p in straight]
    saved = copy.deepcopy(a.state_dict())
    with torch.no_grad():
        for p, value in zip(resumed, saved_params):
            p.copy_(value)
    b = LeanSGD(resumed, fused=True, flat=True, **kwargs)
    b.load_state_dict(saved)              # new momentum tensors: moved into the flat buffer at the next step
    for step in range(3, 7):
        for opt, params in ((a, straight), (b, resumed)):
            opt.zero_grad()
            _backward(params, step)
            opt.step()
        for x, y in zip(straight, resumed):
            assert torch.equal(x, y)
    assert b._fast(b.param_groups[0])[0][0] is b._flat.flat
    # Rebinding a parameter leaves the flat path (torch's fused step instead), with the same result.
    replacement = resumed[0].detach().clone()
    resumed[0].data = replacement
    for opt, params in ((a, straight), (b, resumed)):
        opt.zero_grad()
        _backward(params, 9)
        opt.step()
    assert b._fast(b.param_groups[0])[0][0] is not b._flat.flat
    assert not b._flat.bound(b.state)
    for x, y in zip(straight, resumed):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_flat_sgd_fast_path_checks_what_the_generic_one_does(monkeypatch):
    """step()'s flat shortcut is taken only when every view is in place and nothing else asks
    for torch's step: a replaced momentum buffer, a gradient set to None, a step hook or a
    closure each take the generic path (same result as torch's step)."""
    kwargs = dict(lr=0.05, momentum=0.9)
    want, got = _params(3), _params(3)
    reference, lean = _reference("sgd", want, **kwargs), LeanSGD(got, fused=True, flat=True, **kwargs)
    flat_calls = []
    fused_step = LeanSGD._fused_step
    monkeypatch.setattr(LeanSGD, "_fused_step", lambda self, group, params, grads, buffers: (
        flat_calls.append(params[0] is self._flat.flat), fused_step(self, group, params, grads, buffers)))

    def one_step(step, before=lambda: None, closure=None):
        reference.zero_grad()
        lean.zero_grad()
        _backward(want, step)
        _backward(got, step)
        before()
        reference.step()
        lean.step(closure)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

    one_step(0)                      # builds the state (torch's step)
    one_step(1)
    assert flat_calls[-1] is True and lean._flat.bound(lean.state)
    buffer = lean.state[got[1]]["momentum_buffer"]
    one_step(2, before=lambda: lean.state[got[1]].update(momentum_buffer=buffer.clone()))
    assert lean._flat.bound(lean.state)          # moved back into the flat buffer by that step
    handle = lean.register_step_post_hook(lambda *args: flat_calls.append("hook"))
    calls_before = len(flat_calls)
    one_step(3)
    assert flat_calls[calls_before:] == ["hook"]          # torch's own step, then the hook
    handle.remove()
    calls_before = len(flat_calls)
    one_step(4, closure=lambda: flat_calls.append("closure"))
    assert flat_calls[calls_before:] == ["closure"]
    lean.zero_grad()
    got[2].grad = None                                    # no gradient: not the flat path
    assert not lean._flat.bound(lean.state)
    calls_before = len(flat_calls)
    one_step(5)                                           # zero_grad re-attaches the views
    assert flat_calls[calls_before:] == [True]


def test_zero_grad_without_set_to_none_zeroes_in_place():
    params = _params(5)
    opt = LeanAdam(params, lr=1e-2, fused=True)
    _backward(params, 0)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("kwargs", [dict(lr=0.05, momentum=0.9),
                                    dict(lr=0.05, momentum=0.5, dampening=0.1, nesterov=False, weight_decay=1e-3)])
def test_loop_steps_give_the_steps_of_zero_grad_and_step(kwargs):
    """A training loop's (zero_grad, step) from loop_steps: bitwise the updates of calling the
    flat LeanSGD's own zero_grad and step, its own step until the momentum exists, the kernel on
    the flat buffers after; a learning rate changed between steps is followed; Adam gets its own
    methods."""
    straight, looped = _params(5), _params(5)
    a = LeanSGD(straight, fused=True, flat=True, **kwargs)
    b = LeanSGD(looped, fused=True, flat=True, **kwargs)
    zero_grad, step = loop_steps(b)
    for index in range(6):
        if index == 4:
            for opt in (a, b):
                opt.param_groups[0]["lr"] = 0.01
        a.zero_grad()
        _backward(straight, index)
        a.step()
        zero_grad()
        assert all(p.grad is not None and not p.grad.any() for p in looped)
        _backward(looped, index)
        step()
        assert (step.__self__.kernel_args is None) == (index == 0)     # bound once the momentum exists
        for x, y in zip(straight, looped):
            assert torch.equal(x, y)
    for p, q in zip(straight, looped):
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
    adam_opt = LeanAdam(_params(6), lr=1e-2, fused=True)
    assert loop_steps(adam_opt) == (adam_opt.zero_grad, adam_opt.step)
    plain = LeanSGD(_params(7), lr=0.1, momentum=0.9, fused=True)
    assert loop_steps(plain) == (plain.zero_grad, plain.step)
