"""Double backward (create_graph=True) through the ops, the modules and the cells.

The backward of pyrnn::forward takes its gradients from pyrnn.reference.layer_grads when
grad mode is on during backward, and from the fused kernel otherwise. gradgradcheck runs
in float64 on small odd sizes; second-order results (a gradient penalty's gradient, a
Hessian-vector product) are compared with torch.nn holding the same state_dict.
"""

import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import pyrnn
from pyrnn import ops, reference

from conftest import GATES, MODES, call_op, make_layer_args

T, B, I, H = 4, 3, 3, 5  # small odd sizes: gradgradcheck perturbs every element
LENGTHS = torch.tensor([3, T, 1])  # unsorted, includes T and a length-1 sequence
EPS64 = torch.finfo(torch.float64).eps

CELLS = {
    "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
}
CELL_CLASSES = {"rnn_tanh": ("RNNCell", {"nonlinearity": "tanh"}),
                "rnn_relu": ("RNNCell", {"nonlinearity": "relu"}),
                "lstm": ("LSTMCell", {}), "gru": ("GRUCell", {})}


@pytest.fixture(autouse=True)
def _one_thread():
    # The products here are a few rows wide; with two threads on a busy machine some of
    # those shapes wait milliseconds at the BLAS's barrier, which only slows the tests.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close_to(actual, expected, k=1e3):
    """float64 against float64: both sides round each operation to eps = 2.2e-16 and differ
    only in summation order and in the order of the chain-rule products (fused BPTT,
    ATen's RNN, the reference loop). Through T * layers <= 8 steps, sums of <= 2H + I = 13
    terms and three chained differentiations (forward, gradient, gradient of the gradient),
    the rounding differences stay within k = 1e3 eps of the largest magnitude involved
    (measured: about 10 eps); a wrong term would be of the order of the values."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=k * EPS64 * scale)


def _rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------- ops


def _op_fn(mode, which, kw, weight_hr=None):
    """f(*diff) -> outputs of the op, where diff are the arguments named in ``which``."""
    def f(*diff):
        args = dict(zip(which, diff))
        call_kw = dict(kw)
        if weight_hr is not None:
            call_kw["weight_hr"] = args.pop("w_hr")
        a = [args[n] if n in args else fixed.get(n) for n in ("x", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh")]
        return tuple(o for o in call_op(ops, mode, *a, **call_kw) if o is not None)
    fixed = {}
    return f, fixed


OP_OPTIONS = {
    "plain": {},
    "lengths": {"lengths": LENGTHS},
    "reverse": {"reverse": True},
    "lengths_reverse": {"lengths": LENGTHS, "reverse": True},
    "no_bias": {},
    "x_no_grad": {},   # the input needs no gradient (the forward keeps weight_ih anyway)
    "hx_no_grad": {},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", list(OP_OPTIONS))
def test_op_gradgradcheck(mode, option):
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = make_layer_args(
        mode, T, B, I, H, bias=option != "no_bias", requires_grad=False, seed=3)
    names = ["x", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh"]
    vals = dict(zip(names, [x, hx, cx, w_ih, w_hh, b_ih, b_hh]))
    skip = {"x_no_grad": {"x"}, "hx_no_grad": {"hx", "cx"}}.get(option, set())
    which = [n for n in names if vals[n] is not None and n not in skip]
    f, fixed = _op_fn(mode, which, OP_OPTIONS[option])
    fixed.update(vals)
    diff = [vals[n].clone().requires_grad_() for n in which]
    assert gradgradcheck(f, diff, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_op_gradgradcheck_full(mode):
    """The full (element by element) gradgradcheck, on a tiny layer with lengths."""
    args = make_layer_args(mode, 3, 2, 2, 2, requires_grad=False, seed=2)
    names = ["x", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh"]
    which = [n for n, v in zip(names, args) if v is not None]
    f, _ = _op_fn(mode, which, {"lengths": torch.tensor([2, 3])})
    diff = [v.clone().requires_grad_() for v in args if v is not None]
    assert gradgradcheck(f, diff)


@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, True)])
def test_op_gradgradcheck_lstm_projection(use_lengths, reverse):
    P = 2
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = make_layer_args("lstm", T, B, I, H, seed=4,
                                                        requires_grad=False)
    hx = _rnd(B, P, seed=5) * 0.5
    w_hh = _rnd(4 * H, P, seed=7) * 0.5  # the recurrent product reads the projected h
    w_hr = _rnd(P, H, seed=6) * 0.5
    names = ["x", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    vals = [x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr]
    kw = {"lengths": LENGTHS if use_lengths else None, "reverse": reverse}
    f, _ = _op_fn("lstm", names, kw, weight_hr=w_hr)
    diff = [v.clone().requires_grad_() for v in vals]
    assert gradgradcheck(f, diff, fast_mode=True)


def _clip_and_scale(mode):
    # (clip, scale of the random arguments): the clip lies inside the range of the gate
    # gradients here, so that some of them clip (the test checks that it changes them).
    # (the Elman cells' gradients pass one activation, the gated cells' two or three
    # sigmoid and tanh factors, which make them smaller)
    return (0.3 if GATES[mode] == 1 else 0.05), 1.0


@pytest.mark.parametrize("mode", MODES)
def test_op_bptt_clip_double_backward(mode):
    """With bptt_clip the composite path clamps as the fused kernel does (same first-order
    gradients), the clamp is active here (they differ from the unclipped ones), and the
    clamped gradient is differentiable again (gradgradcheck; the inputs are fixed by the
    seed and lie away from the clamp's corners)."""
    clip, scale = _clip_and_scale(mode)
    args = make_layer_args(mode, T, B, I, H, seed=7, scale=scale)
    leaves = [a for a in args if a is not None]
    cot = None

    def grads(create_graph, c):
        nonlocal cot
        out = [o for o in call_op(ops, mode, *args, lengths=LENGTHS, bptt_clip=c) if o is not None]
        if cot is None:
            cot = [_rnd(*o.shape, seed=8 + k) for k, o in enumerate(out)]
        return torch.autograd.grad(out, leaves, cot, create_graph=create_graph)

    fused, composite, unclipped = grads(False, clip), grads(True, clip), grads(False, 0.0)
    for a, b in zip(composite, fused):
        close_to(a.detach(), b)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(fused, unclipped))

    names = ["x", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh"]
    vals = dict(zip(names, args))
    which = [n for n in names if vals[n] is not None]
    f, fixed = _op_fn(mode, which, {"lengths": LENGTHS, "bptt_clip": clip})
    fixed.update({n: v.detach() for n, v in vals.items() if v is not None})
    assert gradgradcheck(f, [vals[n].detach().clone().requires_grad_() for n in which],
                         fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_op_composite_matches_fused(mode, reverse):
    """First-order gradients and recorded norms: the composite path (create_graph=True)
    gives the fused kernel's values."""
    args = make_layer_args(mode, T, B, I, H, seed=9)
    leaves = [a for a in args if a is not None]
    res = []
    for create_graph in (False, True):
        norms = torch.full((2, T, B), -1.0, dtype=torch.float64)
        out = [o for o in call_op(ops, mode, *args, lengths=LENGTHS, reverse=reverse,
                                  norm_out=norms) if o is not None]
        cot = [_rnd(*o.shape, seed=10 + k) for k, o in enumerate(out)]
        g = torch.autograd.grad(out, leaves, cot, create_graph=create_graph)
        assert all(t.requires_grad == create_graph for t in g)
        assert not norms.requires_grad
        res.append((g, norms))
    (g_fused, n_fused), (g_comp, n_comp) = res
    for a, b in zip(g_comp, g_fused):
        close_to(a.detach(), b)
    close_to(n_comp, n_fused)
    assert n_fused.min() >= 0 and n_fused[0].max() > 0


def test_tied_weights_get_each_argument_share():
    """A tensor passed as both weight_ih and weight_hh: the composite path gives each
    argument its own share, so the total is the fused kernel's."""
    w = (_rnd(H, H, seed=11) * 0.5).requires_grad_()
    x = _rnd(T, B, H, seed=12).requires_grad_()
    hx = _rnd(B, H, seed=13)
    res = []
    for create_graph in (False, True):
        out, h = ops.rnn_tanh(x, hx, w, w)
        res.append(torch.autograd.grad((out ** 2).sum() + h.sum(), w, create_graph=create_graph)[0])
    close_to(res[1].detach(), res[0])


class _CountFused(TorchDispatchMode):
    """Counts the calls of the fused backward op (which the C++ autograd kernel makes
    below autograd, where a dispatch mode sees them)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.pyrnn.backward.default:
            self.calls["fused"] += 1
        return func(*args, **(kwargs or {}))


def test_single_backward_takes_the_fused_path(monkeypatch):
    """Without create_graph the composite path is never taken (and the fused op runs);
    with it, it is."""
    calls = {"composite": 0, "fused": 0}
    composite = reference.layer_grads

    def count_composite(*a, **k):
        calls["composite"] += 1
        return composite(*a, **k)

    monkeypatch.setattr(reference, "layer_grads", count_composite)
    m = pyrnn.LSTM(I, H, num_layers=2, dtype=torch.float64)
    x = _rnd(T, B, I, seed=14).requires_grad_()
    out, _ = m(x)
    with _CountFused(calls):
        out.pow(2).sum().backward()
    assert calls == {"composite": 0, "fused": 2}
    out, _ = m(x)
    with _CountFused(calls):
        torch.autograd.grad(out.pow(2).sum(), list(m.parameters()), create_graph=True)
    assert calls == {"composite": 2, "fused": 2}


def test_backward_op_itself_is_not_differentiable():
    args = make_layer_args("rnn_tanh", T, B, I, H, seed=15)
    x, hx, _, w_ih, w_hh, _, _ = args
    out, _, _, ws = torch.ops.pyrnn.forward("rnn_tanh", x, hx, None, w_ih, w_hh, None, None,
                                            None, None, False, True, 0.0, None)
    grads = torch.ops.pyrnn.backward("rnn_tanh", torch.ones_like(out), None, None, x, hx,
                                     None, w_ih, w_hh, None, False, True, None, out, ws, False,
                                     0.0, False)
    with pytest.raises(RuntimeError, match="pyrnn::backward|pyrnn.backward is not differentiable"):
        grads[0].sum().backward()


# ------------------------------------------------------------------------ modules


def make_pair(cell, dtype=torch.float64, **kw):
    name, extra = CELLS[cell]
    ref = getattr(nn, name)(I, H, dtype=dtype, **extra, **kw)
    ours = getattr(pyrnn, name)(I, H, dtype=dtype, **extra, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


MODULE_OPTIONS = {
    "default": ({}, "padded"),
    "layers2_bidir": ({"num_layers": 2, "bidirectional": True}, "padded"),
    "batch_first_no_bias": ({"batch_first": True, "bias": False}, "padded"),
    "hx": ({"num_layers": 2}, "hx"),
    "packed_bidir": ({"bidirectional": True}, "packed"),
    "unbatched": ({}, "unbatched"),
}


def _module_call(module, cell, how, x, h0):
    """Runs the module on one input form; returns the differentiable outputs."""
    if how == "packed":
        seq = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
        out, h = module(seq)
        out = out.data
    elif how == "hx":
        out, h = module(x, h0)
    elif how == "unbatched":
        out, h = module(x[:, 0])
    else:
        out, h = module(x.transpose(0, 1) if module.batch_first else x)
    return (out, *(h if isinstance(h, tuple) else (h,)))


def _module_inputs(cell, kw, proj=0):
    L = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    x = _rnd(T, B, I, seed=20)
    h0 = _rnd(L, B, proj or H, seed=21) * 0.5
    if cell == "lstm":
        h0 = (h0, _rnd(L, B, H, seed=22) * 0.5)
    return x, h0


def _as_list(h0):
    return list(h0) if isinstance(h0, tuple) else [h0]


class _Form(nn.Module):
    """Calls a recurrent module on one input form, so that functional_call can swap its
    parameters; returns the differentiable outputs as a tuple."""

    def __init__(self, m, cell, how):
        super().__init__()
        self.m, self.cell, self.how = m, cell, how

    def forward(self, x, *states):
        h = None
        if states:
            h = tuple(states) if self.cell == "lstm" else states[0]
        return _module_call(self.m, self.cell, self.how, x, h)


def _cases():
    for cell in CELLS:
        for name in MODULE_OPTIONS:
            yield cell, name
    yield "lstm", "proj"
    yield "lstm", "proj_bidir_hx"


MODULE_OPTIONS_LSTM = {
    "proj": ({"proj_size": 2}, "padded"),
    "proj_bidir_hx": ({"proj_size": 2, "bidirectional": True}, "hx"),
}


def _options(name):
    return MODULE_OPTIONS[name] if name in MODULE_OPTIONS else MODULE_OPTIONS_LSTM[name]


@pytest.mark.parametrize("cell,name", list(_cases()))
def test_module_gradgradcheck(cell, name):
    """gradgradcheck (float64) w.r.t. the input, every parameter and the initial state."""
    kw, how = _options(name)
    ours, _ = make_pair(cell, **kw)
    form = _Form(ours, cell, how)
    x, h0 = _module_inputs(cell, kw, kw.get("proj_size", 0))
    pnames = ["m." + n for n, _ in ours.named_parameters()]
    hs = _as_list(h0) if how == "hx" else []

    def f(x, *rest):
        params = dict(zip(pnames, rest[:len(pnames)]))
        return functional_call(form, params, (x, *rest[len(pnames):]))

    diff = [x.clone().requires_grad_()]
    diff += [p.detach().clone().requires_grad_() for p in ours.parameters()]
    diff += [s.clone().requires_grad_() for s in hs]
    assert gradgradcheck(f, diff, fast_mode=True)


@pytest.mark.parametrize("cell,name", list(_cases()))
def test_module_second_order_matches_torch_nn(cell, name):
    """A gradient penalty's gradient and a Hessian-vector product, pyrnn against torch.nn
    with the same state_dict, w.r.t. the parameters, the input and the initial state."""
    kw, how = _options(name)
    ours, ref = make_pair(cell, **kw)
    x, h0 = _module_inputs(cell, kw, kw.get("proj_size", 0))
    x.requires_grad_()
    hs = [s.requires_grad_() for s in _as_list(h0)] if how == "hx" else []
    h = (tuple(hs) if cell == "lstm" else hs[0]) if hs else None
    results = []
    for m in (ours, ref):
        outs = _module_call(m, cell, how, x, h)
        cot = [_rnd(*o.shape, seed=30 + k) for k, o in enumerate(outs)]
        loss = sum((o * c).sum() for o, c in zip(outs, cot))
        wrt = list(m.parameters()) + [x] + hs
        g = torch.autograd.grad(loss, wrt, create_graph=True)
        penalty = sum((gi ** 2).sum() for gi in g)
        gp = torch.autograd.grad(loss + penalty, wrt, retain_graph=True)
        v = [_rnd(*t.shape, seed=50 + k) for k, t in enumerate(wrt)]
        hvp = torch.autograd.grad(g, wrt, v)
        results.append(list(g) + list(gp) + list(hvp))
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        close_to(a.detach(), b.detach())


def test_module_records_norms_in_double_backward():
    """record_grad_norms: the composite path fills the store as the fused one does."""
    ours = pyrnn.LSTM(I, H, num_layers=2, bidirectional=True, record_grad_norms=True,
                      dtype=torch.float64)
    x = _rnd(T, B, I, seed=60).requires_grad_()
    cot = _rnd(T, B, 2 * H, seed=61)
    norms = []
    for create_graph in (False, True):
        out, _ = ours(x)
        torch.autograd.grad(out, list(ours.parameters()), cot, create_graph=create_graph)
        norms.append(ours.grad_norms)
    assert norms[0].hidden.min() >= 0 and norms[0].hidden.max() > 0
    close_to(norms[1].hidden, norms[0].hidden)
    close_to(norms[1].cell, norms[0].cell)


# -------------------------------------------------------------------------- cells


CELL_OPTIONS = {"hx": (True, True, False), "no_hx": (False, True, False),
                "no_bias": (True, False, False), "unbatched": (True, True, True)}


def _cell_pair(cell, bias):
    name, extra = CELL_CLASSES[cell]
    ref = getattr(nn, name)(I, H, bias=bias, dtype=torch.float64, **extra)
    ours = getattr(pyrnn, name)(I, H, bias=bias, dtype=torch.float64, **extra)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _cell_inputs(cell, give_hx, unbatched):
    shape = (H,) if unbatched else (B, H)
    x = _rnd(*((I,) if unbatched else (B, I)), seed=70)
    hs = []
    if give_hx:
        hs = [_rnd(*shape, seed=71) * 0.5] + ([_rnd(*shape, seed=72) * 0.5] if cell == "lstm" else [])
    return x, hs


def _cell_call(m, cell, x, hs):
    if not hs:
        out = m(x)
    else:
        out = m(x, tuple(hs) if cell == "lstm" else hs[0])
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("cell", list(CELL_CLASSES))
@pytest.mark.parametrize("option", list(CELL_OPTIONS))
def test_cell_gradgradcheck_and_torch_nn(cell, option):
    give_hx, bias, unbatched = CELL_OPTIONS[option]
    ours, ref = _cell_pair(cell, bias)
    x, hs = _cell_inputs(cell, give_hx, unbatched)
    names = [n for n, _ in ours.named_parameters()]

    def f(x, *rest):
        params = dict(zip(names, rest[:len(names)]))
        return functional_call(ours, params, (x,) + (() if not rest[len(names):] else (
            tuple(rest[len(names):]) if cell == "lstm" else rest[len(names)],)))

    diff = [x.clone().requires_grad_()] + [p.detach().clone().requires_grad_()
                                           for p in ours.parameters()]
    diff += [s.clone().requires_grad_() for s in hs]
    assert gradgradcheck(f, diff, fast_mode=True)

    x.requires_grad_()
    hs = [s.requires_grad_() for s in hs]
    results = []
    for m in (ours, ref):
        outs = _cell_call(m, cell, x, hs)
        loss = sum((o * _rnd(*o.shape, seed=80 + k)).sum() for k, o in enumerate(outs))
        wrt = list(m.parameters()) + [x] + hs
        g = torch.autograd.grad(loss, wrt, create_graph=True)
        gp = torch.autograd.grad(loss + sum((gi ** 2).sum() for gi in g), wrt)
        results.append(list(g) + list(gp))
    for a, b in zip(*results):
        close_to(a.detach(), b.detach())


@pytest.mark.parametrize("weights_grad", [True, False])
@pytest.mark.parametrize("name", list(CELLS))
def test_forward_ad(name, weights_grad):
    """Forward-mode AD through torch.autograd.forward_ad (as torch.nn's RNN and GRU take
    it): with a tangent on the input the module runs its reference formulation, whose
    tangent matches a central difference (float64; step 1e-6: an error of about
    u / 1e-6 + 1e-12), whether or not the weights require grad. The op itself, called
    with a tangent, raises NotImplementedError rather than drop it."""
    import torch.autograd.forward_ad as fwAD

    cls_name, kw = CELLS[name]
    torch.manual_seed(5)
    m = getattr(pyrnn, cls_name)(I, H, **kw).double().requires_grad_(weights_grad)
    x, v = _rnd(T, B, I, seed=25), _rnd(T, B, I, seed=26)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, v))[0]).tangent
    eps = 1e-6
    with torch.no_grad():
        central = (m(x + eps * v)[0] - m(x - eps * v)[0]) / (2 * eps)
    torch.testing.assert_close(tangent, central, rtol=1e-6, atol=1e-8)
    args = make_layer_args(name, T, B, I, H)
    with fwAD.dual_level(), pytest.raises(NotImplementedError,
                                          match="forward AD with pyrnn::forward"):
        torch.ops.pyrnn.forward(name, fwAD.make_dual(args[0], torch.ones_like(args[0])),
                                *args[1:], None, None, False, False, 0.0, None)


@pytest.mark.parametrize("name", list(CELLS))
def test_func_transforms(name):
    """torch.func.grad, jvp and vmap through a module (float64, two layers, both
    directions): under a transform each layer runs as its reference formulation, so grad
    matches the fused backward's gradients, jvp a central difference, vmap the loop over
    samples (the fused kernels). Tolerances: the fused and the reference float64 results
    differ by rounding, normwise within K u with K = 2 T (I + H) = 64, the longest chain
    of rounded operations behind an entry (measured: up to 9 u); the central difference
    with step 1e-6 errs by about u / 1e-6 (rounding) + 1e-12 (truncation)."""
    cls_name, kw = CELLS[name]
    torch.manual_seed(3)
    m = getattr(pyrnn, cls_name)(I, H, num_layers=2, bidirectional=True, **kw).double()
    x = _rnd(T, B, I, seed=21)
    params = dict(m.named_parameters())

    def loss(p, xx):
        return functional_call(m, p, (xx,))[0].pow(2).sum()

    got = torch.func.grad(loss)(params, x)
    want = torch.autograd.grad(loss(params, x), list(params.values()))
    for g, w in zip(got.values(), want):
        assert (g - w).abs().max() <= 2 * T * (I + H) * EPS64 * w.abs().max()
    v = _rnd(T, B, I, seed=22)
    _, tangent = torch.func.jvp(lambda xx: m(xx)[0], (x,), (v,))
    eps = 1e-6
    with torch.no_grad():
        central = (m(x + eps * v)[0] - m(x - eps * v)[0]) / (2 * eps)
    torch.testing.assert_close(tangent, central, rtol=1e-6, atol=1e-8)
    xs = torch.stack([x, _rnd(T, B, I, seed=23)])
    batched = torch.func.vmap(lambda xx: m(xx)[0])(xs)
    with torch.no_grad():
        loop = torch.stack([m(xs[0])[0], m(xs[1])[0]])
    assert (batched - loop).abs().max() <= 2 * T * (I + H) * EPS64 * loop.abs().max()


def test_func_transforms_refuse_fused_features():
    m = pyrnn.LSTM(I, H, record_grad_norms=True).double()
    x = _rnd(T, B, I, seed=24)
    with pytest.raises(NotImplementedError, match="record_grad_norms"):
        torch.func.grad(lambda p: functional_call(m, p, (x,))[0].sum())(
            dict(m.named_parameters()))
