"""Round-off bounds derived from the arithmetic, for tests that compare two float32 computations of the
same mathematics in a different order: another kernel, another summation order, or another CPU's vector
code (FMA contraction, a sqrt or division that is 1 ulp off). A bound here holds on every IEEE machine;
none is read off what one CPU printed.

``U`` is float32's unit round-off: one correctly rounded operation moves a value by at most ``U * |value|``,
and an operation with a 1-ulp error (a vendor's sqrt) by at most ``2 * U * |value|``.
"""

from __future__ import annotations

import torch
from torch import Tensor

U = 2.0**-24


def gamma(n: int, u: float = U) -> float:
    """Higham's gamma_n: n roundings in sequence move a result by at most gamma_n times the magnitudes."""
    return n * u / (1 - n * u)


def adamw_bound(grads: list[Tensor], values: list[Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.0) -> Tensor:
    """Elementwise bound on |p - q| after ``len(grads)`` AdamW steps by two implementations that start from
    the same value and get the same gradients (``grads[t]``); ``values[t]`` is the parameter before step t.

    Per step, each implementation makes these roundings: the moments' updates (2 each), the bias
    corrections, sqrt, the eps addition and division (6, one counted twice for a 1-ulp sqrt), the
    weight-decay product and the subtraction of the update from the weight. Their moments' errors
    carry over with weights beta < 1, so they add up (no growth): after t steps
    ``|dm| <= 4tU * M`` with ``M`` the moment of ``|g|``, ``|dv| <= 4tU * v``, so the update's
    relative error is at most ``(4t + 2t + 10) U`` of ``lr * M_hat / (sqrt(v_hat) + eps)``, and the
    weight's roundings add ``4U |p|`` (two implementations, weight decay and subtraction).
    """
    b1, b2 = betas
    g64 = [g.double() for g in grads]
    m = torch.zeros_like(g64[0])
    v = torch.zeros_like(g64[0])
    bound = torch.zeros_like(g64[0])
    for t, (g, p) in enumerate(zip(g64, values), start=1):
        m = b1 * m + (1 - b1) * g.abs()
        v = b2 * v + (1 - b2) * g * g
        size = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        bound += (6 * t + 10) * U * size + 4 * U * p.double().abs() * (1 + lr * weight_decay)
    return bound


def assert_within(got: Tensor, want: Tensor, bound: Tensor, what: str = "") -> None:
    """``|got - want| <= bound`` elementwise, with the worst element named on failure."""
    diff = (got.double() - want.double()).abs()
    excess = diff - bound.double()
    assert (excess <= 0).all(), f"{what}: {diff.flatten()[excess.argmax()].item():.3g} over a bound of " \
                                f"{bound.flatten()[excess.argmax()].item():.3g}"


def swiglu_error(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Bound on how far one float32 evaluation of ``(silu(x @ w1) * (x @ w3)) @ w2`` lies from the exact
    value, in any summation order: each product of inner size n within ``gamma_n`` of its magnitudes,
    silu's slope at most 1.1 plus 8 ulps of its own (exp, add, divide, multiply; a vendor's exp may
    be 2 ulps off), one rounding for the gate product. Two evaluations differ by at most twice this."""
    x, w1, w3, w2 = (t.detach().double() for t in (x, w1, w3, w2))
    a, b = x @ w1, x @ w3
    ea, eb = gamma(w1.shape[0]) * (x.abs() @ w1.abs()), gamma(w3.shape[0]) * (x.abs() @ w3.abs())
    s = torch.nn.functional.silu(a)
    es = 1.1 * ea + 8 * U * a.abs()
    h = s * b
    eh = es * b.abs() + s.abs() * eb + es * eb + U * h.abs()
    return gamma(w2.shape[0]) * ((h.abs() + eh) @ w2.abs()) + eh @ w2.abs()


def adamw_step_bound(value: Tensor, grad: Tensor, state: dict, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 0.0, **_) -> Tensor:
    """Elementwise bound on |p - q| after one AdamW step by two implementations from the same ``value``,
    ``grad`` and moments (``state``: torch's keys, before the step; no moments before the first).

    Each implementation's update ``lr * m_hat / (sqrt(v_hat) + eps)`` takes at most 12 roundings: the
    first moment's 2 (against its terms' magnitudes, since it may cancel), the second's 3, the bias
    corrections' 2, a sqrt that may be 1 ulp off (2), the eps addition, the division and the lr
    product; the weight decay's product and the weight's subtraction round 2 more against |p|."""
    b1, b2 = betas
    g = grad.double()
    m = state["exp_avg"].double() if "exp_avg" in state else torch.zeros_like(g)
    v = state["exp_avg_sq"].double() if "exp_avg_sq" in state else torch.zeros_like(g)
    t = float(state.get("step", 0)) + 1
    m_size = (b1 * m.abs() + (1 - b1) * g.abs()) / (1 - b1**t)
    v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2**t)
    size = lr * m_size / (v_hat.sqrt() + eps)
    p = value.double().abs()
    return 2 * (gamma(12) * size + gamma(2) * p * (1 + lr * weight_decay) + U * (p + size))
