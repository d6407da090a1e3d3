"""bfloat16 products on the CPU: an op given bfloat16 weights with a float32 input
multiplies the weights by its other operands rounded to bfloat16 and sums in float32, in
every compiled copy of the loops (avx512_bf16 in vdpbf16ps, avx512_amx on the matrix units
through oneDNN's brgemm, the others in float32 FMAs).
One step of the ReLU Elman cell isolates the products: h_1 = relu(x W_ih^T + b_ih +
h_0 W_hh^T + b_hh), whose error is that of the sums, checked against float64 sums of the
rounded operands."""
import pytest
import torch

import pyrnn
from conftest import SUPPORTED

U32 = 2.0 ** -24  # float32's unit roundoff


def _bf16(t):
    return t.to(torch.bfloat16).double()


def _within(got, exact, bound):
    # A float32 sum of n terms is off by at most about n u times the sum of their
    # magnitudes (bound); 2x for the order of the sums and the final rounding.
    assert got.dtype == torch.float32
    excess = ((got.double() - exact).abs() - 2 * bound).max().item()
    assert excess <= 0, excess


@pytest.mark.parametrize("capability", SUPPORTED, indirect=True)
@pytest.mark.parametrize("B,I,H", [(1, 5, 37), (2, 64, 64), (11, 37, 45), (300, 67, 130)])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_one_step_products(capability, B, I, H, grad):
    torch.manual_seed(B + I + H)
    x = torch.randn(1, B, I)
    h0 = torch.randn(B, H)
    w_ih = (torch.randn(H, I) / I ** 0.5).to(torch.bfloat16).requires_grad_(grad)
    w_hh = (torch.randn(H, H) / H ** 0.5).to(torch.bfloat16).requires_grad_(grad)
    b_ih, b_hh = torch.randn(H) * 0.1, torch.randn(H) * 0.1
    out, h1 = pyrnn.ops.rnn_relu(x.requires_grad_(grad), h0.requires_grad_(grad), w_ih, w_hh,
                                 b_ih, b_hh)
    xr, hr, wi, wh = _bf16(x[0]), _bf16(h0), w_ih.detach().double(), w_hh.detach().double()
    a = xr @ wi.t() + hr @ wh.t() + b_ih.double() + b_hh.double()
    size = xr.abs() @ wi.abs().t() + hr.abs() @ wh.abs().t() + (b_ih.abs() + b_hh.abs()).double()
    _within(h1, a.clamp(min=0), (I + H + 2) * U32 * size)
    if not grad:
        return
    dy = torch.randn(1, B, H)
    out.backward(dy)
    # gx = dy where the unit is active (from pyrnn's own h1, so a ReLU at the edge agrees),
    # rounded to bfloat16 as the products' operand
    gx = _bf16(dy[0] * (h1.detach() > 0))
    _within(x.grad[0], gx @ wi, H * U32 * (gx.abs() @ wi.abs()))
    _within(h0.grad, gx @ wh, H * U32 * (gx.abs() @ wh.abs()))
    assert w_ih.grad.dtype == w_hh.grad.dtype == torch.bfloat16
    # the weights' gradients: float32 sums over the B rows, rounded to bfloat16 (half a
    # bfloat16 ulp, 2^-8 relative)
    for got, left in ((w_ih.grad, xr), (w_hh.grad, hr)):
        exact, size = gx.t() @ left, gx.abs().t() @ left.abs()
        err = (got.double() - exact).abs()
        assert (err <= 2.0 ** -8 * exact.abs() + 2 * B * U32 * size).all()


def test_rounding_matters():
    # The check above can fail: float32 products of the unrounded operands (a float32
    # run with the same bfloat16 weights) are off by about 2^-9 relative, far beyond it.
    torch.manual_seed(0)
    B, I, H = 11, 37, 45
    x, h0 = torch.randn(1, B, I), torch.randn(B, H)
    w_ih = (torch.randn(H, I) / I ** 0.5).to(torch.bfloat16)
    w_hh = (torch.randn(H, H) / H ** 0.5).to(torch.bfloat16)
    _, h1 = pyrnn.ops.rnn_relu(x, h0, w_ih.float(), w_hh.float())
    wi, wh = w_ih.double(), w_hh.double()
    a = _bf16(x[0]) @ wi.t() + _bf16(h0) @ wh.t()
    size = _bf16(x[0]).abs() @ wi.abs().t() + _bf16(h0).abs() @ wh.abs().t()
    with pytest.raises(AssertionError):
        _within(h1, a.clamp(min=0), (I + H + 2) * U32 * size)


def test_weight_dtypes_checked():
    x, h = torch.randn(3, 2, 4), torch.zeros(2, 5)
    w_ih, w_hh = torch.randn(5, 4), torch.randn(5, 5)
    with pytest.raises(TypeError, match=r"weight_ih: expected dtype BFloat16 \(the dtype of "
                                        r"weight_hh\), got Float"):
        pyrnn.ops.rnn_tanh(x, h, w_ih, w_hh.bfloat16())
    with pytest.raises(TypeError, match=r"weight_ih: expected dtype Float \(the dtype of input\)"
                                        r", got BFloat16"):
        pyrnn.ops.rnn_tanh(x, h, w_ih.bfloat16(), w_hh)
    with pytest.raises(TypeError, match=r"weight_ih: expected dtype Double"):
        pyrnn.ops.rnn_tanh(x.double(), h.double(), w_ih.bfloat16(), w_hh.bfloat16())


@pytest.mark.parametrize("capability", SUPPORTED, indirect=True)
@pytest.mark.parametrize("name,T,B,H", [
    ("LSTM", 6, 16, 72),    # split by batch rows (weights under 1 MB)
    ("LSTM", 4, 12, 400),   # split by units on the matrix units (bfloat16 weights over 1 MB)
    ("GRU", 5, 7, 100),     # split by units (fewer than 4 rows a thread)
    ("RNN", 5, 33, 40),
])
def test_bfloat16_bitwise_equal_across_thread_counts(capability, name, T, B, H):
    """Under bfloat16 autocast, outputs, states and every gradient have the same bits on
    1 - 3 threads: each product's tiles are fixed by its shape, not by the threads."""
    torch.manual_seed(0)
    m = getattr(pyrnn, name)(H, H, num_layers=2)
    x = torch.randn(T, B, H)
    cot = torch.randn(T, B, H)

    def run():
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, h = m(xx)
        states = list(h) if isinstance(h, tuple) else [h]
        grads = torch.autograd.grad((out.float() * cot).sum(), [xx, *m.parameters()])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            inf = m(x)[0]
        return [out, *states, *grads, inf]

    old = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = run()
    finally:
        torch.set_num_threads(old)
    assert all(t.float().isfinite().all() for t in results[1])
    for n in (2, 3):
        diff = [i for i, (a, b) in enumerate(zip(results[1], results[n])) if not torch.equal(a, b)]
        assert not diff, f"{n} threads: results {diff} differ from 1 thread"
