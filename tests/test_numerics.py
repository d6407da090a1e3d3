"""Non-finite values and thread counts: pyrnn against torch.nn, and against itself.

1. NaN, +Inf, -Inf and values near the float32 limits in inputs, states and weights:
   outputs, final states and every gradient must have NaN and +-Inf exactly where
   torch.nn has them, and finite values must agree with torch.nn.
2. The same call gives bitwise the same outputs, states, gradients, recorded gradient
   norms and gate statistics with 1, 2, 3 and 4 threads.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyrnn

CELLS = {
    "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
}
DTYPES = [torch.float32, torch.float64]


def make_pair(cell, I, H, dtype, **kw):
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    ref = getattr(nn, name)(I, H, dtype=dtype, **extra, **kw)
    ours = getattr(pyrnn, name)(I, H, dtype=dtype, **extra, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# ---------------------------------------------------------------------------------------
# 1. NaN, Inf and the float32 limits against torch.nn

T, I, H = 5, 4, 8

# Each scenario edits the inputs (x, h0, c0) and the state_dict in place.
def _nan_x(x, h, c, sd):
    x[1, 0, 0] = math.nan


def _inf_x(x, h, c, sd):
    x[1, 0, 0] = math.inf


def _ninf_x(x, h, c, sd):
    x[2, 1, 1] = -math.inf


def _nan_h0(x, h, c, sd):
    h[0, 1, 3] = math.nan


def _inf_c0(x, h, c, sd):  # the LSTM's cell state; for the others the hidden state
    (c if c is not None else h)[0, 2, 5] = math.inf


def _nan_w_hh(x, h, c, sd):
    sd["weight_hh_l0"][1, 2] = math.nan


def _inf_w_ih(x, h, c, sd):
    sd["weight_ih_l0"][0, 1] = math.inf


def _ninf_w_ih(x, h, c, sd):
    sd["weight_ih_l0"][-1, 0] = -math.inf


def _inf_b_hh(x, h, c, sd):
    sd["bias_hh_l0"][3] = math.inf
    sd["bias_hh_l0"][-2] = -math.inf


def _huge_h0(x, h, c, sd):  # far from overflow in one product, saturating every gate
    h.mul_(1e30)


def _near_max(x, h, c, sd):
    """Single entries near the largest float32. The ReLU passes its input on linearly, so
    that products of its states (W_hh h, dW = sum over steps of gx h) add several terms of
    that size, and whether such a sum overflows depends on the order of its terms, which no
    two matmul implementations share; for the ReLU the entries are 1e36, where the sums
    stay finite in any order."""
    big = 1e36 if sd.get("_relu") else 3e38
    x[1, :, 0] = big
    x[3, :, 2] = -big


def _denormal(x, h, c, sd):  # inputs and states in float32's subnormal range
    x.mul_(1e-39)
    h.mul_(1e-39)
    if c is not None:
        c.mul_(1e-39)


SCENARIOS = {f.__name__[1:]: f for f in [_nan_x, _inf_x, _ninf_x, _nan_h0, _inf_c0, _nan_w_hh,
                                         _inf_w_ih, _ninf_w_ih, _inf_b_hh, _huge_h0,
                                         _near_max, _denormal]}


def _run(module, x, h, c, cot):
    """Outputs, final states and the gradients of sum(cotangent * result) with respect to
    the input, the initial states and every parameter, as a dict of tensors."""
    x = x.clone().requires_grad_(True)
    h = h.clone().requires_grad_(True)
    c = c.clone().requires_grad_(True) if c is not None else None
    out, hn = module(x, (h, c) if c is not None else h)
    res = {"output": out}
    if c is not None:
        res["h_n"], res["c_n"] = hn
    else:
        res["h_n"] = hn
    names = list(res)
    loss = sum((res[k] * cot[k]).sum() for k in names)
    leaves = {"grad_input": x, "grad_h0": h}
    if c is not None:
        leaves["grad_c0"] = c
    leaves.update({"grad_" + n: p for n, p in module.named_parameters()})
    grads = torch.autograd.grad(loss, list(leaves.values()))
    res.update({k: g for k, g in zip(leaves, grads)})
    return {k: v.detach() for k, v in res.items()}


def _check_like(got, ref, truth, eps, what):
    """NaN where ref has NaN, +-Inf where ref has it; finite values within a tolerance that
    comes from torch.nn's own error in this precision: |got - ref| <= 4 * |ref - truth| (the
    two implementations differ in summation order and in the float32 exp and tanh, each
    within a few ulp, as torch.nn's own rounding does against the float64 truth), plus 16
    ulp of the tensor's largest finite value and of the smallest normal number (subnormal
    results carry absolute, not relative, rounding)."""
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN positions differ"
    inf = ref.isinf()
    assert torch.equal(got.isinf(), inf), f"{what}: Inf positions differ"
    assert torch.equal(got[inf], ref[inf]), f"{what}: Inf signs differ"
    fin = ref.isfinite()
    if not fin.any():
        return
    g, r = got[fin].double(), ref[fin].double()
    t = truth[fin]
    ok_t = t.isfinite()
    ref_err = torch.where(ok_t, (r - t).abs(), torch.zeros_like(r))
    scale = r.abs().max().item()
    tiny = torch.finfo(ref.dtype).tiny
    tol = 4 * ref_err + 16 * eps * scale + 16 * eps * tiny
    bad = (g - r).abs() > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} finite values differ, max "
                           f"{(g - r).abs().max().item():.3g} (scale {scale:.3g})")


# float32 without grad: a batch >= 8 projects the input in the loop
@pytest.mark.parametrize("B", [3, 9])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_nonfinite_like_torch(cell, scenario, dtype, B):
    ours, ref = make_pair(cell, I, H, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    h = torch.randn(1, B, H, generator=g, dtype=dtype)
    c = torch.randn(1, B, H, generator=g, dtype=dtype) if cell == "lstm" else None
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["_relu"] = cell == "rnn_relu"
    SCENARIOS[scenario](x, h, c, sd)
    del sd["_relu"]
    ref.load_state_dict(sd)
    ours.load_state_dict(sd)
    cot = {"output": torch.randn(T, B, H, generator=g, dtype=dtype),
           "h_n": torch.randn(1, B, H, generator=g, dtype=dtype),
           "c_n": torch.randn(1, B, H, generator=g, dtype=dtype)}
    got = _run(ours, x, h, c, cot)
    want = _run(ref, x, h, c, cot)
    with torch.no_grad():  # the same arithmetic (in the loop at B = 9): the same bits
        out, hn = ours(x, (h, c) if c is not None else h)
    plain = {"output": out, **({"h_n": hn[0], "c_n": hn[1]} if c is not None else {"h_n": hn})}
    for k, v in plain.items():
        torch.testing.assert_close(v, got[k], rtol=0, atol=0, equal_nan=True)
    # the float64 truth for the tolerance: torch.nn in float64 on the same values
    ref64 = ref.to(torch.float64)
    truth = _run(ref64, x.double(), h.double(), c.double() if c is not None else None,
                 {k: v.double() for k, v in cot.items()})
    eps = torch.finfo(dtype).eps
    assert set(got) == set(want)
    for k in want:
        _check_like(got[k], want[k], truth[k], eps, f"{cell} {scenario} {k}")


def test_float32_gru_huge_state_gradient():
    """The case that a sigmoid stuck at ~4.6e-39 instead of 0 broke: a float32 GRU with a
    huge initial state gets torch.nn's (and float64's) weight gradient, not 6e22."""
    ours, ref = make_pair("gru", I, H, torch.float32)
    x = torch.randn(T, 3, I)
    h0 = torch.randn(1, 3, H) * 1e30
    ga = torch.autograd.grad(ours(x, h0)[0].sum(), list(ours.parameters()))
    gb = torch.autograd.grad(ref(x, h0)[0].sum(), list(ref.parameters()))
    for a, b in zip(ga, gb):
        assert a.isfinite().all() and a.abs().max() < 1e3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_activations_at_the_limits(dtype):
    """One step of each cell with pre-activations at +-Inf, NaN and the overflow edges of
    float32's exp, read through h_n: the values torch.nn gives."""
    vals = torch.tensor([math.nan, math.inf, -math.inf, 88.5, -88.5, 88.8, -88.8, 104.0,
                         -104.0, 3e38, -3e38, 1e-45, -1e-45, 0.0], dtype=dtype)
    n = vals.numel()
    for cell in CELLS:
        ours, ref = make_pair(cell, 1, n, dtype, bias=False)
        G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell]
        sd = {"weight_ih_l0": vals.repeat(G).unsqueeze(1), "weight_hh_l0": torch.zeros(G * n, n,
                                                                                   dtype=dtype)}
        ours.load_state_dict(sd)
        ref.load_state_dict(sd)
        x = torch.ones(1, 1, 1, dtype=dtype)
        a, b = ours(x)[0], ref(x)[0]
        assert torch.equal(a.isnan(), b.isnan()), cell
        keep = ~b.isnan()
        # a few ulp apart (the float32 exp and tanh against torch's, composed in the LSTM
        # and GRU); subnormal results are as exact as their absolute spacing allows
        torch.testing.assert_close(a[keep], b[keep], rtol=16 * torch.finfo(dtype).eps,
                                   atol=16 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps,
                                   msg=cell)


def _ulps(got, truth):
    """|got - truth| in units of the last place of truth rounded to float32."""
    r = truth.float().double()
    ulp = torch.ldexp(torch.ones_like(r), torch.frexp(r)[1] - 24)
    return (got.double() - truth).abs() / ulp


def test_float32_tanh_accuracy():
    """The kernels' float32 tanh, read through h_n of a one-step Elman layer whose
    pre-activations are the inputs themselves (W_ih a column of ones, W_hh zero, no bias:
    every sum exact). 19 units: SIMD lanes and a scalar tail. Its error analysis bounds it
    by 1.75 ulp (the quotient of 1 - 2 / (1 + e^2|x|) is at most 0.39 where that form is
    used, its three roundings count at most half there, plus the final rounding; measured
    over every float from 1e-6 to 10.5: 1.07, and 0.75 for the polynomial below 0.7); on
    average it must be within 0.05 ulp of the correctly rounded values' own error on the
    same points (measured 0.002 above it, as torch's tanh here; the tanh of 2.4 ulp that
    made pyrnn's float32 recurrences several times less accurate than torch.nn's was 0.21
    above it; 0.05 is one more ulp at one point in twenty). Where tanh
    rounds to +-1 (|x| > 9.01) it must be exactly that: the backward's 1 - h^2 is then 0,
    and 0 * Inf gives torch.nn's NaN."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 14
    wide = torch.rand(n, generator=g, dtype=torch.float64) * 24 - 12
    small = torch.ldexp(torch.rand(n, generator=g, dtype=torch.float64) + 1,
                        -torch.randint(1, 41, (n,), generator=g))
    x = torch.cat([wide, small, -small]).float()
    H = 19
    rnn = pyrnn.RNN(1, H, bias=False)
    with torch.no_grad():
        rnn.weight_ih_l0.fill_(1.0)
        rnn.weight_hh_l0.zero_()
        _, h = rnn(x.view(1, -1, 1))
    truth = torch.tanh(x.double())
    err = _ulps(h[0], truth.unsqueeze(1))
    rounded_err = _ulps(truth.float(), truth)
    assert err.max().item() <= 1.75, err.max().item()
    saturated = x.abs() > 9.02
    assert torch.equal(h[0][saturated], x[saturated].sign().unsqueeze(1).expand(-1, H))
    assert err.mean().item() <= rounded_err.mean().item() + 0.05, (err.mean().item(),
                                                                   rounded_err.mean().item())


# ---------------------------------------------------------------------------------------
# 2. Bitwise the same results for 1, 2, 3 and 4 threads

# H = 136 = 4 * 32 + 8: the float32 loops split it across threads (panels of 32 units)
# and end each row with a scalar tail; B = 16 and T * B = 192 rows make every product
# large enough to run on several threads.
TT, BB, II, HH = 12, 16, 24, 136
LENGTHS = [12, 3, 7, 12, 1, 9, 12, 5, 2, 11, 8, 12, 4, 6, 10, 12]
THREADS = [1, 2, 3, 4]

CONFIGS = [(cell, bidi, 0) for cell in CELLS for bidi in (False, True)] + \
          [("lstm", False, 40), ("lstm", True, 40)]


def _one_and_two_threads(f):
    """f() on one thread, then on two (torch's and OpenMP's count restored after)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = f()
        torch.set_num_threads(2)
        two = f()
    finally:
        torch.set_num_threads(old)
    return one, two


def _thread_run(cell, dtype, packed, bidi, proj):
    kw = {"num_layers": 2, "bidirectional": bidi}
    if proj:
        kw["proj_size"] = proj
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    m = getattr(pyrnn, name)(II, HH, dtype=dtype, record_grad_norms=True,
                             record_gate_stats=True, **extra, **kw)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(TT, BB, II, generator=g, dtype=dtype).requires_grad_(True)
    D = 2 if bidi else 1
    P = proj or HH
    h0 = torch.randn(2 * D, BB, P, generator=g, dtype=dtype).requires_grad_(True)
    hx = h0
    if cell == "lstm":
        c0 = torch.randn(2 * D, BB, HH, generator=g, dtype=dtype).requires_grad_(True)
        hx = (h0, c0)
    if packed:
        inp = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
        out, hn = m(inp, hx)
        out = pad_packed_sequence(out)[0]
    else:
        out, hn = m(x, hx)
    hn = list(hn) if isinstance(hn, tuple) else [hn]
    cots = [torch.randn(t.shape, generator=g, dtype=dtype) for t in [out] + hn]
    loss = sum((t * c).sum() for t, c in zip([out] + hn, cots))
    leaves = [x, h0] + ([c0] if cell == "lstm" else []) + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves)
    res = [out, *hn, *grads, m.grad_norms.hidden, m.gate_stats.factor, m.gate_stats.saturated]
    if cell == "lstm":
        res.append(m.grad_norms.cell)
    return [t.detach().clone() for t in res]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cell,bidi,proj", CONFIGS,
                         ids=[f"{c}-{'bi' if b else 'uni'}{'-proj' if p else ''}"
                              for c, b, p in CONFIGS])
def test_bitwise_equal_across_thread_counts(cell, bidi, proj, dtype, packed):
    old = torch.get_num_threads()
    try:
        results = {}
        for n in THREADS:
            torch.set_num_threads(n)
            results[n] = _thread_run(cell, dtype, packed, bidi, proj)
    finally:
        torch.set_num_threads(old)
    base = results[THREADS[0]]
    assert all(t.isfinite().all() for t in base)
    for n in THREADS[1:]:
        diff = [i for i, (a, b) in enumerate(zip(base, results[n])) if not torch.equal(a, b)]
        assert not diff, f"{n} threads: results {diff} differ from 1 thread"


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_inference_bitwise_equal_across_thread_counts(cell, lengths):
    """The float32 forward without grad (B = 16: the time loop projects the inputs itself,
    one step ahead, between the two halves of its split barrier) gives the same bits on
    1 - 4 threads, both directions, and the bits of the forward with grad."""
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    m = getattr(pyrnn, name)(II, HH, num_layers=2, bidirectional=True, **extra)
    x = torch.randn(TT, BB, II, generator=torch.Generator().manual_seed(2))
    if lengths:
        x = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    old = torch.get_num_threads()
    results = {}
    try:
        for n in THREADS:
            torch.set_num_threads(n)
            with torch.no_grad():
                out, h = m(x)
            results[n] = [out.data if lengths else out] + list(h if cell == "lstm" else [h])
        with torch.enable_grad():
            out, h = m(x)
        saved = [out.data if lengths else out] + list(h if cell == "lstm" else [h])
    finally:
        torch.set_num_threads(old)
    for n in THREADS[1:] + ["grad"]:
        other = saved if n == "grad" else results[n]
        diff = [i for i, (a, b) in enumerate(zip(results[1], other)) if not torch.equal(a, b)]
        assert not diff, f"{n}: results {diff} differ from 1 thread without grad"


@pytest.mark.parametrize("lengths", [None, "sorted", "unsorted"])
@pytest.mark.parametrize("B", [7, 8, 17, 40])
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_loops_split_by_batch_rows(cell, B, lengths):
    """Two threads split the float32 time loops by batch rows where each gets four rows or
    more (B = 8: 4 + 4, B = 17: 8 + 9, B = 40: 20 + 20), by hidden units below that
    (B = 7; one thread here runs every row). Outputs, states, every gradient
    and the recorded norms are the bits of one thread, forward with and without grad;
    with lengths (sorted longest first, the rows still running at a step are a prefix of
    the batch and each thread multiplies its part of it; unsorted, every row runs and
    finished ones keep their state), and like torch.nn against float64 (_check_like)."""
    T, H = 11, 128
    ours, ref = make_pair(cell, H, H, torch.float32)
    ours.record_grad_norms = True
    truth = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    h = torch.randn(1, B, H, generator=g, dtype=torch.float64)
    c = torch.randn(1, B, H, generator=g, dtype=torch.float64) if cell == "lstm" else None
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        if lengths == "sorted":
            lens = lens.sort(descending=True).values

    def run(m, dtype):
        xs = x.to(dtype).requires_grad_(True)
        hs = h.to(dtype).requires_grad_(True)
        state = hs if c is None else (hs, c.to(dtype).requires_grad_(True))
        inp = pack_padded_sequence(xs, lens, enforce_sorted=False) if lens is not None else xs
        out, hn = m(inp, state)
        out = out.data if lens is not None else out
        hn = list(hn) if isinstance(hn, tuple) else [hn]
        loss = sum((t.double() * (1.0 + torch.arange(t.numel(), dtype=torch.float64)
                                  .reshape(t.shape).sin())).sum() for t in [out] + hn)
        leaves = [xs, hs] + ([state[1]] if c is not None else []) + list(m.parameters())
        res = [out, *hn, *torch.autograd.grad(loss, leaves)]
        with torch.no_grad():
            res.append(m(inp, state)[0].data if lens is not None else m(inp, state)[0])
        if m is ours:
            res.append(m.grad_norms.hidden)
        return [t.detach() for t in res]

    one, two = _one_and_two_threads(lambda: run(ours, torch.float32))
    diff = [i for i, (a, b) in enumerate(zip(one, two)) if not torch.equal(a, b)]
    assert not diff, f"results {diff} differ between one and two threads"
    assert torch.equal(one[-2], one[0]), "the forward without grad differs from with grad"
    want, exact = run(ref, torch.float32), run(truth, torch.float64)
    eps = torch.finfo(torch.float32).eps
    for i, (a, b, t) in enumerate(zip(one[:-1], want, exact)):
        _check_like(a, b, t, eps, f"result {i}")


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_batches_of_one_and_two(cell, B):
    """A step's product for one or two rows runs up to four panels (32 columns each) at
    once, taken across the gate blocks. At these sizes the forward with grad runs a team
    of two threads (2 B G H^2 >= 2^19 flops per step; B = 1: H = 320, ten panels per
    gate block, split 5 + 5; B = 2: H = 224, seven, 4 + 3; the Elman RNN's single block at
    H = 544 and 384), so a thread's panels come from every block. Bitwise the same on one
    and two threads, the forward without grad the bits of the forward with grad, and like
    torch.nn against float64 (_check_like). With B = 2 and lengths 9 and 5 the rows go
    from two to one."""
    H = {(1, True): 544, (2, True): 384, (1, False): 320, (2, False): 224}[B, cell == "rnn_tanh"]
    T = 9
    ours, ref = make_pair(cell, H, H, torch.float32)
    truth = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    h = torch.randn(1, B, H, generator=g, dtype=torch.float64)
    c = torch.randn(1, B, H, generator=g, dtype=torch.float64) if cell == "lstm" else None
    names = ["output", "h_n"] + (["c_n"] if cell == "lstm" else [])
    cot = {k: torch.randn((T if k == "output" else 1), B, H, generator=g,
                          dtype=torch.float64) for k in names}
    f32 = {k: v.float() for k, v in cot.items()}
    x32, h32 = x.float(), h.float()
    c32 = c.float() if c is not None else None
    state = (h32, c32) if c is not None else h32
    packed = B == 2
    lengths = torch.tensor([T, T - 4])
    old = torch.get_num_threads()
    runs, inference = {}, {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs[n] = _run(ours, x32, h32, c32, f32)
            with torch.no_grad():
                inference[n] = ours(x32, state)[0]
                if packed:
                    inference[n, "packed"] = ours(pack_padded_sequence(x32, lengths),
                                                  state)[0].data
    finally:
        torch.set_num_threads(old)
    for k in runs[1]:
        assert torch.equal(runs[1][k], runs[2][k]), f"{k}: 1 and 2 threads differ"
    assert torch.equal(inference[1], inference[2]) and torch.equal(inference[1],
                                                                    runs[1]["output"])
    want = _run(ref, x32, h32, c32, f32)
    exact = _run(truth, x, h, c, cot)
    eps = torch.finfo(torch.float32).eps
    for k in runs[1]:
        _check_like(runs[1][k], want[k], exact[k], eps, k)
    if packed:
        assert torch.equal(inference[1, "packed"], inference[2, "packed"])
        with torch.no_grad():
            want_p = ref(pack_padded_sequence(x32, lengths), state)[0].data
            exact_p = truth(pack_padded_sequence(x, lengths),
                            (h, c) if c is not None else h)[0].data
        _check_like(inference[1, "packed"], want_p, exact_p, eps, "packed output")


# ---------------------------------------------------------------------------------------
# 3. Wide layers: the weight gradients' products with a copied left operand (gemm.h copies
#    the transposed gate gradients per thread where the gradient is 128 columns wide or
#    more, in passes of 1024 over the T * B rows)

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_wide_weight_gradients(cell):
    """I = 300 and H = 260 (both weight gradients take the copy; the gate rows, 1040 or 780,
    end in a partial chunk and a split block), T * B = 1120 rows (a full pass of 1024 and a
    partial one). Bitwise the same on one and two threads, and within float32's bound of
    float64: each entry is a float32 sum of K = T * B products, whose rounding error is at
    most about K u times the sum of the terms' magnitudes; normwise, against the largest
    entry, that is K u = 1120 u here (measured: 17 - 26 u; torch.nn's oneDNN and BLAS sums,
    blocked differently, 5 - 20 u). A misplaced or missing row of the copy moves an entry
    by the size of a term: of order one against it."""
    T, B, I, H = 70, 16, 300, 260
    ours, ref = make_pair(cell, I, H, torch.float64)
    ours = ours.float()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    cot = torch.randn(T, B, H, generator=g, dtype=torch.float64)

    def weight_grads(m, dtype):
        y, _ = m(x.to(dtype))
        return torch.autograd.grad((y * cot.to(dtype)).sum(), [m.weight_ih_l0, m.weight_hh_l0])

    one, two = _one_and_two_threads(lambda: weight_grads(ours, torch.float32))
    truth = weight_grads(ref, torch.float64)
    bound = T * B * 2.0**-24
    for a, b, t in zip(one, two, truth):
        assert torch.equal(a, b)
        err = ((a.double() - t).abs().max() / t.abs().max()).item()
        assert err <= bound, (err / 2.0**-24, "u")
