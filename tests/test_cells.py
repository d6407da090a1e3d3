"""The registry of cells, and the cells torch.nn does not have (the leaky-ReLU Elman RNN),
held to pyrnn.reference at the module level: the matrix that test_modules.py runs against
torch.nn for the others (layers, directions, batch_first, packed and unbatched input,
initial states, float32 and float64, cells), plus clipping, norms, gate statistics, the
regulariser, torch.compile, ONNX export and the argument checks."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyrnn
from pyrnn import _C, gradflow, ops, reference, tasks

T, B, I, H = 6, 3, 4, 5
LENGTHS = torch.tensor([4, T, 1])  # unsorted, includes T and a length-1 sequence
F64 = torch.float64


# ---- the registry ----

def test_registry_is_the_one_list():
    """Every cell of the compiled registry has its reference step and gate factor, and
    nothing else is registered in Python."""
    names = [c["name"] for c in _C.cells()]
    assert len(set(names)) == len(names)
    assert set(names) == set(reference.STEPS) == set(reference.GATE_FACTORS)
    assert list(ops.CELLS) == names
    for c in _C.cells():
        assert c["gates"] >= 1 and c["saved"] >= 0
        # a workspace row holds the gates, the saved values and c_t
        assert c["workspace"] in (0, c["gates"] + c["saved"] + int(c["has_cell"]))
    assert ops.CELLS["rnn_leaky_relu"]["params"] == {"negative_slope": 0.01}
    assert ops.CELLS["lstm"]["projection"] and not ops.CELLS["gru"]["projection"]


def test_unknown_mode_names_every_cell():
    x = torch.randn(2, 1, 3)
    with pytest.raises(ValueError) as e:
        torch.ops.pyrnn.forward("rnn_elu", x, torch.zeros(1, 2), None, torch.randn(2, 3),
                                torch.randn(2, 2), None, None, None, None, False, False, 0.0,
                                None)
    for name in ops.CELLS:
        assert f"'{name}'" in str(e.value)
    assert "got 'rnn_elu'" in str(e.value)


@pytest.mark.parametrize("params,match", [
    ([0.1, 0.2], "takes 1 constant"), ([-0.5], "negative_slope: expected a finite number >= 0"),
    ([float("nan")], "negative_slope: expected a finite number >= 0, got nan"),
    ([float("inf")], "negative_slope")])
def test_op_checks_the_constants(params, match):
    x = torch.randn(2, 1, 3)
    with pytest.raises(ValueError, match=match):
        torch.ops.pyrnn.forward("rnn_leaky_relu", x, torch.zeros(1, 2), None, torch.randn(2, 3),
                                torch.randn(2, 2), None, None, None, None, False, False, 0.0,
                                None, cell_params=params)
    with pytest.raises(ValueError, match="takes 0 constant"):
        torch.ops.pyrnn.forward("rnn_tanh", x, torch.zeros(1, 2), None, torch.randn(2, 3),
                                torch.randn(2, 2), None, None, None, None, False, False, 0.0,
                                None, cell_params=[0.1])


# ---- the leaky-ReLU Elman RNN against the reference ----

def _reference_module(m, x, h0, lengths=None):
    """m's forward through pyrnn.reference (x [T, B, I] padded; h0 [L*D, B, H])."""
    D = 2 if m.bidirectional else 1
    weights = [m._weights(layer, d) for layer in range(m.num_layers) for d in range(D)]
    return reference.stack("rnn_leaky_relu", x, h0, None, weights, lengths, m.bidirectional,
                           m.bptt_clip, [m.negative_slope])[:2]


def _rand(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _tol(dtype, ours, ref64, ref32=None):
    """float64: 16 float64 ulps of the largest value, at least 1e-12 (these short sums are
    off by a few ulps; the BLAS sums in another order on another CPU: with the weights
    tripled, values reach 6e3 and an Intel CPU's MKL gives 1.3 ulps where an AMD's gave
    less than 1e-12). float32: twice the reference's own float32 error against float64
    plus 8 float32 ulps of the values."""
    if dtype == F64:
        return max(1e-12, 16 * torch.finfo(F64).eps * ref64.abs().max().item())
    eps = torch.finfo(torch.float32).eps
    return 2 * (ref32.double() - ref64).abs().max().item() + 8 * eps * max(
        ref64.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("layers,bidir,batch_first,slope", [
    (1, False, False, 0.01), (2, True, False, 0.2), (2, False, True, 0.0), (1, True, True, 1.5)])
def test_leaky_module_matches_reference(dtype, layers, bidir, batch_first, slope):
    torch.manual_seed(0)
    m = pyrnn.RNN(I, H, layers, nonlinearity="leaky_relu", negative_slope=slope,
                  bidirectional=bidir, batch_first=batch_first, dtype=dtype)
    with torch.no_grad():  # weights large enough that many units go negative
        for p in m.parameters():
            p.mul_(3)
    D = 2 if bidir else 1
    x = _rand(T, B, I, dtype=dtype).requires_grad_()
    h0 = _rand(layers * D, B, H, dtype=dtype, seed=1).requires_grad_()
    out, h_n = m(x.transpose(0, 1) if batch_first else x, h0)
    if batch_first:
        out = out.transpose(0, 1)
    m64 = copy.deepcopy(m).double()
    x64, h64 = x.detach().double().requires_grad_(), h0.detach().double().requires_grad_()
    r_out, r_h = _reference_module(m64, x64, h64)
    cot, cot_h = _rand(*out.shape, seed=2), _rand(*h_n.shape, seed=3)
    grads = torch.autograd.grad([out, h_n], [x, h0, *m.parameters()],
                                [cot.to(dtype), cot_h.to(dtype)])
    r_grads = torch.autograd.grad([r_out, r_h], [x64, h64, *m64.parameters()], [cot, cot_h])
    if dtype == F64:
        refs32 = [None] * (2 + len(grads))
    else:  # the reference's own float32 result, to measure float32's error
        m32 = copy.deepcopy(m)
        x32, h32 = x.detach().clone().requires_grad_(), h0.detach().clone().requires_grad_()
        o32, hn32 = _reference_module(m32, x32, h32)
        g32 = torch.autograd.grad([o32, hn32], [x32, h32, *m32.parameters()],
                                  [cot.float(), cot_h.float()])
        refs32 = [o32, hn32, *g32]
    for k, (a, r, r32) in enumerate(zip([out, h_n, *grads], [r_out, r_h, *r_grads], refs32)):
        tol = _tol(dtype, a, r, r32)
        assert (a.double() - r).abs().max().item() <= tol, k


def test_leaky_module_packed_and_unbatched():
    torch.manual_seed(0)
    m = pyrnn.RNN(I, H, 2, nonlinearity="leaky_relu", negative_slope=0.3, bidirectional=True,
                  dtype=F64)
    x = _rand(T, B, I)
    h0 = _rand(4, B, H, seed=1)
    seq = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    out, h_n = m(seq, h0)
    out, _ = pad_packed_sequence(out, total_length=T)
    r_out, r_h = _reference_module(m, x, h0, LENGTHS)
    torch.testing.assert_close(out, r_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n, r_h, rtol=0, atol=1e-12)
    # unbatched input: the batch of one, squeezed
    out1, h1 = m(x[:, 1], h0[:, 1])
    r1, rh1 = _reference_module(m, x[:, 1:2], h0[:, 1:2])
    torch.testing.assert_close(out1, r1[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(h1, rh1[:, 0], rtol=0, atol=1e-12)


def test_leaky_gradcheck_module():
    torch.manual_seed(0)
    m = pyrnn.RNN(3, 4, 2, nonlinearity="leaky_relu", negative_slope=0.1, bidirectional=True,
                  dtype=F64)
    x = _rand(4, 2, 3).requires_grad_()
    h0 = _rand(4, 2, 4, seed=1).requires_grad_()

    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, h0, *values):
        return torch.func.functional_call(m, dict(zip(names, values)), (x, h0))

    assert torch.autograd.gradcheck(f, (x, h0, *params))


def test_leaky_cell_matches_reference_and_gradcheck():
    torch.manual_seed(0)
    c = pyrnn.RNNCell(I, H, nonlinearity="leaky_relu", negative_slope=0.25, dtype=F64)
    x, h = _rand(B, I), _rand(B, H, seed=1)
    a = x @ c.weight_ih.T + c.bias_ih + h @ c.weight_hh.T + c.bias_hh
    torch.testing.assert_close(c(x, h), torch.nn.functional.leaky_relu(a, 0.25), rtol=0,
                               atol=1e-14)
    # unbatched: one row through the BLAS, whose kernel for one row may sum in another
    # order than for B rows (MKL on an Intel CPU: 2 ulps apart)
    eps = torch.finfo(F64).eps
    torch.testing.assert_close(c(x[0], h[0]), c(x, h)[0], rtol=4 * eps, atol=4 * eps)
    torch.testing.assert_close(c(x), c(x, torch.zeros(B, H, dtype=F64)), rtol=0, atol=0)
    xg, hg = x.clone().requires_grad_(), h.clone().requires_grad_()
    assert torch.autograd.gradcheck(c, (xg, hg))
    assert "negative_slope=0.25" in repr(c)


def test_leaky_clip_norms_and_gate_stats():
    """bptt_clip and the recorded norms of the module equal the reference's (per layer and
    direction), and the gate statistics are the factor 1 or negative_slope."""
    torch.manual_seed(0)
    slope, clip = 0.2, 0.05
    m = pyrnn.RNN(I, H, 2, nonlinearity="leaky_relu", negative_slope=slope, bidirectional=True,
                  bptt_clip=clip, record_grad_norms=True, record_gate_stats=True, dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)
    x = _rand(T, B, I).requires_grad_()
    out, _ = m(x)
    cot = _rand(T, B, 2 * H, seed=2)
    out.backward(cot)
    weights = [m._weights(layer, d) for layer in range(2) for d in range(2)]
    x64 = x.detach().clone().requires_grad_()
    steps = []
    r_out, _, _ = reference.stack("rnn_leaky_relu", x64, torch.zeros(4, B, H, dtype=F64), None,
                                  [[None if w is None else w.detach().clone().requires_grad_()
                                    for w in ws] for ws in weights], None, True, clip, [slope],
                                  steps)
    r_out.backward(cot)
    torch.testing.assert_close(x.grad, x64.grad, rtol=0, atol=1e-12)
    clipped = x.grad.clone()
    norms = m.grad_norms.hidden  # [L*D, T, B]
    for k, record in enumerate(steps):
        for s in record:
            want = s["h"].grad.norm(dim=1)
            torch.testing.assert_close(norms[k, s["t"]], want, rtol=1e-12, atol=1e-14)
    # the clip is active here: without it the input gradient differs
    m.bptt_clip = 0.0
    x.grad = None
    m(x)[0].backward(cot)
    assert (x.grad - clipped).abs().max() > 1e-6
    stats = m.gate_stats
    assert stats.factor.shape == (4, T, B)
    out0 = out.detach()[..., :H]  # layer 1 (the last), forward direction
    neg = (out0 <= 0).double()
    torch.testing.assert_close(stats.factor[2], (1 - neg + slope * neg).mean(-1), rtol=0,
                               atol=1e-14)
    torch.testing.assert_close(stats.saturated[2], neg.mean(-1), rtol=0, atol=1e-14)


def test_leaky_vanishing_penalty_matches_reference():
    torch.manual_seed(0)
    m = pyrnn.RNN(I, H, nonlinearity="leaky_relu", negative_slope=0.3, vanishing_penalty=0.7,
                  dtype=F64)
    x = _rand(T, B, I)
    out, _ = m(x)
    cot = _rand(T, B, H, seed=2)
    out.backward(cot)
    got = m.weight_hh_l0.grad.clone()
    w = [p.detach().clone().requires_grad_() for p in m._weights(0, 0)[:4]]
    steps = []
    r_out, _ = reference.rnn_leaky_relu(x, torch.zeros(B, H, dtype=F64), *w, steps=steps,
                                        negative_slope=0.3)
    r_out.backward(cot, retain_graph=True)
    omega, _ = reference.vanishing_penalty("rnn_leaky_relu", steps, w[1], params=[0.3])
    expected = w[1].grad + 0.7 * torch.autograd.grad(omega, w[1])[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.vanishing_omega[0], omega.detach(), rtol=1e-10, atol=1e-12)


def test_leaky_module_compiles():
    torch.manual_seed(0)
    m = pyrnn.RNN(I, H, nonlinearity="leaky_relu", negative_slope=0.2)
    x = torch.randn(T, B, I)
    eager = m(x)[0]
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x)[0], eager, rtol=0, atol=0)


def test_leaky_module_arguments():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'elu'"):
        pyrnn.RNN(I, H, nonlinearity="elu")
    with pytest.raises(ValueError, match="negative_slope: only nonlinearity='leaky_relu'"):
        pyrnn.RNN(I, H, nonlinearity="relu", negative_slope=0.1)
    with pytest.raises(ValueError, match="negative_slope: only nonlinearity='leaky_relu'"):
        pyrnn.RNNCell(I, H, negative_slope=0.1)
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="negative_slope: expected a finite number >= 0"):
            pyrnn.RNN(I, H, nonlinearity="leaky_relu", negative_slope=bad)
    m = pyrnn.RNN(I, H, nonlinearity="leaky_relu")
    assert m.negative_slope == 0.01 and m.mode == "RNN_LEAKY_RELU"
    assert repr(m) == "RNN(4, 5, nonlinearity='leaky_relu', negative_slope=0.01)"
    with pytest.raises(ValueError, match="has no torch.nn counterpart"):
        pyrnn.to_torch(m)
    assert gradflow.activation_gamma(m) == 1.0
    assert tasks.make_module("rnn_leaky_relu", 2, 3).nonlinearity == "leaky_relu"


def test_leaky_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = pyrnn.RNN(I, H, 2, nonlinearity="leaky_relu", negative_slope=0.2, bidirectional=True,
                  batch_first=True).eval()
    x = torch.randn(B, T, I)
    with torch.no_grad():
        want = m(x)
    path = tmp_path / "leaky.onnx"
    torch.onnx.export(m, (x,), path, dynamo=False, input_names=["x"])
    import onnx
    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LeakyRelu" in op_types and not {"RNN", "Loop", "Scan"} & op_types, op_types
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    for g, w in zip(got, want):
        # float32 the same per-step operations in another order: a few ulps of |values| ~ 1
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=1e-5)


def test_constants_by_name():
    assert ops.constants("rnn_leaky_relu") == [0.01]
    assert ops.constants("rnn_leaky_relu", negative_slope=0.3) == [0.3]
    assert ops.constants("lstm") == []
    with pytest.raises(TypeError, match="takes the constants \\['negative_slope'\\]"):
        ops.constants("rnn_leaky_relu", slope=0.3)


@pytest.mark.parametrize("unbatched,with_hx", [(False, False), (False, True), (True, True)])
def test_leaky_cell_export_runs_in_onnxruntime(tmp_path, unbatched, with_hx):
    # The cell exports as the reference's step (plain operators, LeakyRelu among them).
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = pyrnn.RNNCell(I, H, nonlinearity="leaky_relu", negative_slope=0.2).eval()
    x = torch.randn(I) if unbatched else torch.randn(B, I)
    args = (x, torch.randn(x.shape[:-1] + (H,))) if with_hx else (x,)
    with torch.no_grad():
        want = m(*args)
    path = tmp_path / "leaky_cell.onnx"
    names = ["x", "h"][:len(args)]
    torch.onnx.export(m, args, path, dynamo=False, input_names=names)
    import onnx
    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LeakyRelu" in op_types and "RNN" not in op_types, op_types
    got, = ort.InferenceSession(str(path)).run(None, {n: a.numpy() for n, a in zip(names, args)})
    # float32, the same operations in another order: a few ulps of |values| ~ 1
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-5)
