"""The LayerNorm-LSTM (pyrnn.LayerNormLSTM, pyrnn.ops.ln_lstm) held to pyrnn.reference, the
plain-PyTorch formulation (torch.nn.functional.layer_norm and autograd): the op in float64
and float32 with every gradient, packed (lengths) and reversed, clipping and the recorded
norms, gradcheck and double backward; the module over layers, directions, batch_first,
packed and unbatched input; thread-count independence, torch.compile, ONNX export, gate
statistics and the argument checks."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyrnn
from pyrnn import ops, reference
from conftest import nudged

T, B, I, H = 6, 3, 4, 5
LENGTHS = torch.tensor([4, T, 1])  # unsorted, includes T and a length-1 sequence
F64 = torch.float64


def _rand(*shape, dtype=F64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)


def _args(dtype=F64, bias=True, seed=0):
    """(x, h0, c0, w_ih, w_hh, cell_weight, b_ih, b_hh) with gains and biases away from
    their initial values, so that a wrong slot of cell_weight shows."""
    x = _rand(T, B, I, dtype=dtype, seed=seed)
    h0 = _rand(B, H, dtype=dtype, seed=seed + 1)
    c0 = _rand(B, H, dtype=dtype, seed=seed + 2)
    w_ih = _rand(4 * H, I, dtype=dtype, seed=seed + 3, scale=0.5)
    w_hh = _rand(4 * H, H, dtype=dtype, seed=seed + 4, scale=0.5)
    cw = 1 + _rand(10 * H, dtype=dtype, seed=seed + 5, scale=0.3)
    cw[9 * H:] -= 1  # beta_c around 0
    b = [_rand(4 * H, dtype=dtype, seed=seed + 6 + k, scale=0.3) for k in range(2)] if bias \
        else [None, None]
    return [x, h0, c0, w_ih, w_hh, cw, *b]


def _grads(fn, args, cots):
    args = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    outs = fn(*args)
    wrt = [a for a in args if a is not None]
    got = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
    return [o.detach() for o in outs], list(got)


def _op(lengths, reverse, clip, eps=1e-5, norm_out=None):
    def fn(x, h0, c0, w_ih, w_hh, cw, b_ih, b_hh):
        return ops.ln_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, clip,
                           norm_out, cell_weight=cw, eps=eps)
    return fn


def _ref(lengths, reverse, clip, eps=1e-5):
    def fn(x, h0, c0, w_ih, w_hh, cw, b_ih, b_hh):
        return reference.ln_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, clip,
                                 cell_weight=cw, eps=eps)
    return fn


# float32 tolerances. The layer norms make this cell ill-conditioned where a normalised
# vector has a small spread (a norm over H = 5 values of c_t, here): their backward
# subtracts means of products from values of similar size and multiplies the difference
# by 1/sigma, which reaches tens or hundreds. Any float32 implementation then errs by
# about that condition number times float32's rounding, and two implementations' errors
# differ by chance, so one run of the float32 reference is a single sample of the error
# to compare with. The tolerance takes the largest error of the float32 reference over
# its plain run and PERTURBED runs on inputs and weights moved by one float32 rounding
# (relative 2^-24, seeded): the error a backward-stable float32 computation can have.
PERTURBED = 3


def _tol32(r64, refs32):
    """Twice the largest error of the float32 reference's runs refs32 against the float64
    r64, plus 8 float32 ulps of the values."""
    eps = torch.finfo(torch.float32).eps
    err = max((r.double() - r64).abs().max().item() for r in refs32)
    return 2 * err + 8 * eps * max(r64.abs().max().item(), 1.0)


def _cots(dtype):
    return [_rand(T, B, H, dtype=dtype, seed=20), _rand(B, H, dtype=dtype, seed=21),
            _rand(B, H, dtype=dtype, seed=22)]


def test_registry_entry():
    c = ops.CELLS["ln_lstm"]
    assert c["layer_norm"] and c["row_wise"] and c["has_cell"] and c["split_grad"]
    assert c["cell_weights"] == 10 and c["params"] == {"eps": 1e-5}
    assert c["workspace"] == c["gates"] + c["saved"] + 1
    assert not any(ops.CELLS[m]["layer_norm"] for m in ("lstm", "gru", "rnn_tanh"))


@pytest.mark.parametrize("lengths,reverse,clip,bias,eps", [
    (None, False, 0.0, True, 1e-5), (LENGTHS, False, 0.0, True, 1e-5),
    (LENGTHS, True, 0.0, False, 1e-3), (None, True, 0.05, True, 1e-5),
    (LENGTHS, False, 0.05, True, 0.1)])
def test_op_float64_matches_reference(lengths, reverse, clip, bias, eps):
    """Outputs, states and every gradient (input, h0, c0, both weights, the cell weights,
    both biases) in float64: 1e-11, some hundred ulps of these short sums (the kernel and
    the reference sum the means and variances in different orders)."""
    args = _args(bias=bias)
    cots = _cots(F64)
    out, grads = _grads(_op(lengths, reverse, clip, eps), args, cots)
    r_out, r_grads = _grads(_ref(lengths, reverse, clip, eps), args, cots)
    for a, b in zip(out + grads, r_out + r_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    if clip:  # the clip acted: the unclipped gradients differ
        _, free = _grads(_ref(lengths, reverse, 0.0, eps), args, cots)
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(free, r_grads))


@pytest.mark.parametrize("lengths,reverse", [(None, False), (LENGTHS, True)])
def test_op_float32_within_the_references_own_error(lengths, reverse):
    """float32 against the float64 reference, within _tol32."""
    args = _args(F64)
    cots = _cots(F64)
    r64_out, r64_grads = _grads(_ref(lengths, reverse, 0.0), args, cots)
    a32 = [a.float() for a in args]
    c32 = [c.float() for c in cots]
    out, grads = _grads(_op(lengths, reverse, 0.0), a32, c32)
    runs = [sum(_grads(_ref(lengths, reverse, 0.0), args, c32), [])
            for args in [a32] + [nudged(a32, k) for k in range(PERTURBED)]]
    for k, (ours, r64) in enumerate(zip(out + grads, r64_out + r64_grads)):
        tol = _tol32(r64, [run[k] for run in runs])
        assert (ours.double() - r64).abs().max().item() <= tol


def test_norms_match_reference():
    """The recorded ||dLoss/dh_t|| and ||dLoss/dc_t|| against the reference's autograd."""
    args = _args()
    cots = _cots(F64)
    norms = torch.full((2, T, B), -1.0, dtype=F64)
    _grads(_op(LENGTHS, False, 0.0, norm_out=norms), args, cots)
    inputs = [a.detach().clone().requires_grad_() for a in args]
    inputs = inputs[:5] + [inputs[6], inputs[7], None, inputs[5]]
    _, r_norms = reference.layer_grads("ln_lstm", inputs, cots, LENGTHS, False, 0.0,
                                       record=True)
    torch.testing.assert_close(norms, r_norms, rtol=0, atol=1e-11)
    assert (norms[:, 4:, 0] == 0).all() and (norms[:, 0, 0] > 0).all()


def test_gradcheck_and_double_backward():
    args = [a.detach().clone().requires_grad_() for a in _args(seed=3)]
    small = [args[0][:3, :2], args[1][:2], args[2][:2]] + args[3:]
    small = [a.detach().clone().requires_grad_() for a in small]
    lengths = torch.tensor([3, 2])

    def fn(*a):
        return ops.ln_lstm(a[0], a[1], a[2], a[3], a[4], a[6], a[7], lengths, cell_weight=a[5])
    assert torch.autograd.gradcheck(fn, small)
    assert torch.autograd.gradgradcheck(fn, small)


def test_thread_count_does_not_change_a_bit():
    """Large enough that the loops run a team of threads (rows split between threads in
    the pointwise phase, columns in the products): the same bits on one thread."""
    torch.manual_seed(0)
    m = pyrnn.LayerNormLSTM(32, 128)
    x = torch.randn(5, 8, 32, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = None
            m.zero_grad()
            out, (h, c) = m(x)
            (out.sum() + h.sum() + c.square().sum()).backward()
            results.append([out, x.grad] + [p.grad for p in m.parameters()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- the module ----

def _module_reference(m, x, h0, c0, lengths=None):
    D = 2 if m.bidirectional else 1
    weights = [tuple(m._weights(layer, d)) + (m._cell_weight(layer, d),)
               for layer in range(m.num_layers) for d in range(D)]
    return reference.stack("ln_lstm", x, h0, c0, weights, lengths, m.bidirectional, m.bptt_clip,
                           [m.eps])


def _perturb(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("layers,bidir,batch_first", [(1, False, False), (2, True, False),
                                                      (2, False, True)])
def test_module_matches_reference(dtype, layers, bidir, batch_first):
    torch.manual_seed(0)
    m = pyrnn.LayerNormLSTM(I, H, layers, bidirectional=bidir, batch_first=batch_first,
                            dtype=dtype)
    _perturb(m)
    D = 2 if bidir else 1
    x = _rand(T, B, I, dtype=dtype).requires_grad_()
    h0 = _rand(layers * D, B, H, dtype=dtype, seed=1).requires_grad_()
    c0 = _rand(layers * D, B, H, dtype=dtype, seed=2).requires_grad_()
    out, (h_n, c_n) = m(x.transpose(0, 1) if batch_first else x, (h0, c0))
    if batch_first:
        out = out.transpose(0, 1)
    cots = [_rand(*t.shape, seed=5 + k) for k, t in enumerate((out, h_n, c_n))]
    grads = torch.autograd.grad([out, h_n, c_n], [x, h0, c0, *m.parameters()],
                                [c.to(dtype) for c in cots])

    def ref(module, xx, hh, cc):
        leaves = [t.detach().clone().requires_grad_() for t in (xx, hh, cc)]
        r = _module_reference(module, *leaves)
        g = torch.autograd.grad(list(r), leaves + list(module.parameters()),
                                [c.to(xx.dtype) for c in cots])
        return [t.detach() for t in r] + list(g)
    r64 = ref(copy.deepcopy(m).double(), x.double(), h0.double(), c0.double())
    mine = [out, h_n, c_n] + list(grads)
    if dtype == F64:
        for a, b in zip(mine, r64):
            # a few hundred ulps of these sums, relative to values that reach 3e2
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-11)
    else:
        runs = [ref(copy.deepcopy(m), x, h0, c0)]
        for k in range(PERTURBED):
            mk = copy.deepcopy(m)
            with torch.no_grad():
                for p, q in zip(mk.parameters(), nudged(list(m.parameters()), 100 + k)):
                    p.copy_(q)
            runs.append(ref(mk, *nudged([x, h0, c0], k)))
        for i, (a, b) in enumerate(zip(mine, r64)):
            assert (a.double() - b).abs().max().item() <= _tol32(b, [run[i] for run in runs])


def test_module_packed_and_unbatched():
    torch.manual_seed(1)
    m = pyrnn.LayerNormLSTM(I, H, 2, bidirectional=True, dtype=F64)
    _perturb(m)
    x = _rand(T, B, I)
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    out, (h_n, c_n) = m(packed)
    padded, _ = pad_packed_sequence(out, total_length=T)
    zeros = torch.zeros(4, B, H, dtype=F64)
    r_out, r_h, r_c = _module_reference(m, x, zeros, zeros, LENGTHS)
    torch.testing.assert_close(padded, r_out, rtol=0, atol=1e-11)
    torch.testing.assert_close(h_n, r_h, rtol=0, atol=1e-11)
    torch.testing.assert_close(c_n, r_c, rtol=0, atol=1e-11)
    # unbatched: the batch of one, squeezed
    out1, (h1, c1) = m(x[:, 0])
    ref1, (rh1, rc1) = m(x[:, :1])
    torch.testing.assert_close(out1, ref1[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(h1, rh1[:, 0], rtol=0, atol=0)


def test_module_parameters_and_init():
    m = pyrnn.LayerNormLSTM(I, H, 2, bidirectional=True, eps=1e-3)
    names = dict(m.named_parameters())
    for sfx in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        assert names["ln_gain_ih" + sfx].shape == (4 * H,)
        assert names["ln_gain_hh" + sfx].shape == (4 * H,)
        assert (names["ln_gain_c" + sfx] == 1).all() and (names["ln_bias_c" + sfx] == 0).all()
        assert names["weight_ih" + sfx].shape[0] == 4 * H
    m.ln_gain_c_l0.data.fill_(3.0)
    m.reset_parameters()
    assert (m.ln_gain_c_l0 == 1).all()
    assert "eps=0.001" in repr(m)
    assert pyrnn.to_torch(m) is m  # no torch.nn counterpart: left as it is


def test_module_errors():
    with pytest.raises(ValueError, match="proj_size"):
        pyrnn.LayerNormLSTM(I, H, proj_size=2)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps: expected a finite number > 0"):
            pyrnn.LayerNormLSTM(I, H, eps=bad)
    with pytest.raises(ValueError, match="vanishing_penalty"):
        pyrnn.LayerNormLSTM(I, H, vanishing_penalty=0.1)
    m = pyrnn.LayerNormLSTM(I, H)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(T, B, I + 1))
    with pytest.raises(RuntimeError, match="Expected hidden\\[1\\] size"):
        m(torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(1, B, H + 1)))


def test_op_checks_cell_weight():
    x, h0, c0, w_ih, w_hh, cw, b_ih, b_hh = _args()
    with pytest.raises(ValueError, match="cell_weight: mode 'ln_lstm' needs its weights"):
        torch.ops.pyrnn.forward("ln_lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None,
                                False, False, 0.0, None)
    with pytest.raises(ValueError, match=r"cell_weight: expected shape \[50\], got \[49\]"):
        ops.ln_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell_weight=cw[:-1])
    with pytest.raises(TypeError, match="cell_weight: expected dtype"):
        ops.ln_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell_weight=cw.float())
    with pytest.raises(ValueError, match="cell_weight: mode 'lstm' takes none"):
        torch.ops.pyrnn.forward("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None,
                                False, False, 0.0, None, cell_weight=cw)
    with pytest.raises(ValueError, match="eps: expected a finite number >= 0"):
        ops.ln_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell_weight=cw, eps=-1.0)


def test_clip_norms_and_gate_stats_in_the_module():
    torch.manual_seed(2)
    m = pyrnn.LayerNormLSTM(I, H, bptt_clip=0.01, record_grad_norms=True,
                            record_gate_stats=True, dtype=F64)
    x = _rand(T, B, I)
    out, _ = m(x)
    (out ** 2).sum().backward()
    norms = m.grad_norms
    assert norms.hidden.shape == (1, T, B) and (norms.hidden > 0).all()
    assert norms.cell is not None and (norms.cell > 0).all()
    stats = m.gate_stats
    # the LSTM's factor: the mean forget gate of every step, from the reference's steps
    steps = []
    reference.stack("ln_lstm", x, torch.zeros(1, B, H, dtype=F64),
                    torch.zeros(1, B, H, dtype=F64),
                    [tuple(m._weights(0, 0)) + (m._cell_weight(0, 0),)], params=[m.eps],
                    steps=steps)
    f = torch.stack([s["gate"].mean(1) for s in steps[0]])
    torch.testing.assert_close(stats.factor[0], f.detach(), rtol=0, atol=1e-12)


def test_compile_matches_eager():
    torch.manual_seed(3)
    m = pyrnn.LayerNormLSTM(I, H, 2)
    _perturb(m)
    x = torch.randn(T, B, I)
    compiled = torch.compile(m, fullgraph=True)
    out, (h, c) = compiled(x)
    e_out, (e_h, e_c) = m(x)
    torch.testing.assert_close(out, e_out, rtol=0, atol=0)
    out.sum().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    e_out.sum().backward()
    for a, p in zip(g, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    m = pyrnn.LayerNormLSTM(I, H, 2, bidirectional=True).eval()
    _perturb(m)
    x = torch.randn(T, B, I)
    path = tmp_path / "ln_lstm.onnx"
    torch.onnx.export(m, (x,), str(path), input_names=["x"], output_names=["y", "h", "c"],
                      dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, h, c = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        e_y, (e_h, e_c) = m(x)
    # float32 through a different sequence of operations: within 1e-5 of values near 1
    torch.testing.assert_close(torch.from_numpy(y), e_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(c), e_c, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- the cell

def _cell_and_module(dtype=F64, eps=1e-3):
    torch.manual_seed(5)
    cell = pyrnn.LayerNormLSTMCell(I, H, eps=eps, dtype=dtype)
    _perturb(cell)
    m = pyrnn.LayerNormLSTM(I, H, eps=eps, dtype=dtype)
    with torch.no_grad():
        for name, p in cell.named_parameters():
            getattr(m, name + "_l0").copy_(p)
    return cell, m


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cell_steps_are_the_module(dtype):
    # The cell runs the module's op with T = 1: step by step over a sequence it gives the
    # module's results, batched and unbatched: bit for bit in float32 (pyrnn's kernel sums
    # every row alike, whatever the number of rows), within a few roundings in float64
    # (whose products come from the BLAS, whose kernels depend on the number of rows).
    cell, m = _cell_and_module(dtype)
    if dtype == F64:
        def same(a, b):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
            return True
    else:
        same = torch.equal
    x = _rand(T, B, I, dtype=dtype, seed=3)
    h0, c0 = _rand(B, H, dtype=dtype, seed=4), _rand(B, H, dtype=dtype, seed=5)
    y, (h_n, c_n) = m(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    h, c = h0, c0
    for t in range(T):
        h, c = cell(x[t], (h, c))
        assert same(h, y[t])
    assert same(h, h_n[0]) and same(c, c_n[0])
    hu, cu = cell(x[0, 1], (h0[1], c0[1]))
    assert hu.shape == (H,) and same(hu, y[0, 1])
    h1, _ = cell(x[0])  # no state given: zeros
    y1, _ = m(x[:1])
    assert same(h1, y1[0])


def test_cell_gradcheck_and_init():
    cell, _ = _cell_and_module(F64)
    x = _rand(B, I, seed=6).requires_grad_()
    h0 = _rand(B, H, seed=7).requires_grad_()
    c0 = _rand(B, H, seed=8).requires_grad_()
    params = list(cell.parameters())

    def f(x, h0, c0, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
                cell, dict(zip([n for n, _ in cell.named_parameters()], ps))):
            return cell(x, (h0, c0))
    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))
    fresh = pyrnn.LayerNormLSTMCell(3, 4)
    assert torch.equal(fresh.ln_gain_ih, torch.ones(16)) and torch.equal(fresh.ln_gain_c,
                                                                        torch.ones(4))
    assert torch.equal(fresh.ln_bias_c, torch.zeros(4))
    assert "eps=1e-05" in repr(fresh)
    for bad in (0, -1.0, float("inf"), True, "1e-5"):
        with pytest.raises(ValueError, match="eps: expected a finite number > 0"):
            pyrnn.LayerNormLSTMCell(3, 4, eps=bad)


def test_cell_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cell, _ = _cell_and_module(torch.float32)
    cell.eval()
    x, h0, c0 = _rand(B, I, dtype=torch.float32), _rand(B, H, dtype=torch.float32, seed=1), \
        _rand(B, H, dtype=torch.float32, seed=2)
    path = tmp_path / "ln_lstm_cell.onnx"
    torch.onnx.export(cell, (x, (h0, c0)), str(path), input_names=["x", "h0", "c0"],
                      output_names=["h", "c"], dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h, c = sess.run(None, {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()})
    with torch.no_grad():
        e_h, e_c = cell(x, (h0, c0))
    # float32 through a different sequence of operations: within 1e-5 of values near 1
    torch.testing.assert_close(torch.from_numpy(h), e_h, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(c), e_c, rtol=0, atol=1e-5)
