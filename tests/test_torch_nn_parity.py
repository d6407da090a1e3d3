"""pyrnn against torch.nn as the oracle: the same exceptions (type and torch.nn's wording)
for bad constructor arguments and bad inputs, the same answers where torch.nn accepts an
input, and PyTorch's own recurrent-module samples (module_db in
torch.testing._internal.common_modules) run through both."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pyrnn

T, B, I, H = 5, 3, 4, 7
f64 = torch.float64

MODULES = {
    "rnn_tanh": lambda **k: nn.RNN(I, H, dtype=f64, **k),
    "rnn_relu": lambda **k: nn.RNN(I, H, nonlinearity="relu", dtype=f64, **k),
    "lstm": lambda **k: nn.LSTM(I, H, dtype=f64, **k),
    "lstm_proj": lambda **k: nn.LSTM(I, H, proj_size=2, dtype=f64, **k),
    "gru": lambda **k: nn.GRU(I, H, dtype=f64, **k),
}
CELLS = {
    "rnn_tanh_cell": lambda: nn.RNNCell(I, H, dtype=f64),
    "rnn_relu_cell": lambda: nn.RNNCell(I, H, nonlinearity="relu", dtype=f64),
    "lstm_cell": lambda: nn.LSTMCell(I, H, dtype=f64),
    "gru_cell": lambda: nn.GRUCell(I, H, dtype=f64),
}


def _state(kind, shape, **kw):
    """hx of the given leading shape for a module kind: a tensor, or (h, c) for the LSTM."""
    g = torch.Generator().manual_seed(7)
    if kind.startswith("lstm"):
        P = 2 if kind == "lstm_proj" else H
        return (torch.randn(*shape, P, generator=g, **kw), torch.randn(*shape, H, generator=g, **kw))
    return torch.randn(*shape, H, generator=g, **kw)


def _x(*shape, **kw):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=f64).to(**kw)


def _module_cases(kind):
    """(name, call) pairs of calls that torch.nn rejects; call(module) makes the call."""
    x = _x(T, B, I)
    packed = pack_padded_sequence(x, [5, 3, 2])
    return [
        ("rank1", lambda m: m(_x(I))),
        ("rank4", lambda m: m(_x(1, T, B, I))),
        ("input_size", lambda m: m(_x(T, B, I + 1))),
        ("input_size_unbatched", lambda m: m(_x(T, I + 1))),
        ("empty_sequence", lambda m: m(_x(0, B, I))),
        ("empty_sequence_unbatched", lambda m: m(_x(0, I))),
        ("hx_batch", lambda m: m(x, _state(kind, (1, B + 1), dtype=f64))),
        ("hx_layers", lambda m: m(x, _state(kind, (2, B), dtype=f64))),
        ("hx_2d_for_batched", lambda m: m(x, _state(kind, (B,), dtype=f64))),
        ("hx_3d_for_unbatched", lambda m: m(x[:, 0], _state(kind, (1, B), dtype=f64))),
        ("hx_dtype", lambda m: m(x, _state(kind, (1, B), dtype=torch.float32))),
        ("input_dtype", lambda m: m(x.float())),
        ("input_int64", lambda m: m(x.long())),
        ("input_list", lambda m: m(x.tolist())),
        ("hx_meta", lambda m: m(x, _state(kind, (1, B), dtype=f64, device="meta"))),
        ("input_meta", lambda m: m(x.to("meta"))),
    ] + ([
        # ATen's lstm takes exactly two states (checked after the sizes); torch.nn reads
        # hx[1] first
        ("hx_three", lambda m: m(x, (_state(kind, (1, B), dtype=f64) * 2)[:3])),
        ("hx_three_list", lambda m: m(x, list(_state(kind, (1, B), dtype=f64)) * 2)),
        ("hx_one", lambda m: m(x, _state(kind, (1, B), dtype=f64)[:1])),
    ] if kind.startswith("lstm") else []) + ([] if kind.startswith("lstm") else [
        # torch.nn's LSTM runs no input check on packed input (a matmul or an index fails
        # deep inside instead); pyrnn's LSTM runs the checks of the other modules there
        ("packed_rank1", lambda m: m(PackedSequence(_x(6), torch.tensor([3, 2, 1])))),
        ("packed_hx_batch", lambda m: m(packed, _state(kind, (1, B + 1), dtype=f64))),
        ("packed_input_size", lambda m: m(pack_padded_sequence(_x(T, B, I + 1), [5, 3, 2]))),
    ])


def _outcome(fn):
    try:
        return None, fn()
    except Exception as e:  # the outcome of either side is what is compared
        return e, None


def _same_error(ref_exc, our_exc):
    """Same type; torch.nn's message contained in pyrnn's. Device mismatches in the cells
    are reported by ATen's TensorIterator, whose message names the two devices in an order
    that depends on which operand it meets first: there the two device names must appear."""
    assert our_exc is not None, f"torch.nn raised {ref_exc!r}, pyrnn did not"
    assert type(our_exc) is type(ref_exc), f"{type(our_exc).__name__} ({our_exc}) vs {ref_exc!r}"
    ref_msg, our_msg = str(ref_exc), str(our_exc)
    if ref_msg.startswith("Tensor on device"):
        assert "cpu" in our_msg and "meta" in our_msg, our_msg
    else:
        assert ref_msg in our_msg, f"{our_msg!r} does not contain torch.nn's {ref_msg!r}"


def _check_case(make, call):
    """call(torch.nn's module) must raise; call(its pyrnn conversion) must raise the same."""
    ref = make()
    ours = pyrnn.convert(make())
    ref_exc, _ = _outcome(lambda: call(ref))
    assert ref_exc is not None, "the case is meant to be rejected by torch.nn"
    our_exc, _ = _outcome(lambda: call(ours))
    _same_error(ref_exc, our_exc)


_MODULE_CASES = [(k, n) for k in MODULES for n, _ in _module_cases(k)]


@pytest.mark.parametrize("kind,case", _MODULE_CASES, ids=[f"{k}-{n}" for k, n in _MODULE_CASES])
def test_module_errors_match_torch_nn(kind, case):
    _check_case(MODULES[kind], dict(_module_cases(kind))[case])


def _cell_cases(kind):
    is_lstm = kind == "lstm_cell"
    x = _x(B, I)

    def st(*shape, **kw):
        kw.setdefault("dtype", f64)
        g = torch.Generator().manual_seed(5)
        s = torch.randn(*shape, generator=g, dtype=kw.pop("dtype")).to(**kw)
        return (s, s.clone()) if is_lstm else s

    return [
        ("rank0", lambda m: m(torch.tensor(1.0, dtype=f64))),
        ("rank3", lambda m: m(_x(1, B, I))),
        ("input_size", lambda m: m(_x(B, I + 1))),
        ("input_size_unbatched", lambda m: m(_x(I + 1))),
        ("hx_rank3", lambda m: m(x, st(1, B, H))),
        ("hx_batch", lambda m: m(x, st(B + 1, H))),
        ("hx_hidden", lambda m: m(x, st(B, H + 1))),
        ("hx_batched_for_unbatched", lambda m: m(x[0], st(B, H))),
        ("hx_1d_for_batched", lambda m: m(x, st(H))),
        ("hx_dtype", lambda m: m(x, st(B, H, dtype=torch.float32))),
        ("input_dtype", lambda m: m(x.float())),
        ("input_int64", lambda m: m(x.long())),
        ("hx_meta", lambda m: m(x, st(B, H, device="meta"))),
        ("input_meta", lambda m: m(x.to("meta"))),
    ] + ([
        # ATen's lstm_cell takes a tuple of exactly two states, checked before any size
        ("hx_three", lambda m: m(x, st(B, H) + st(B, H)[:1])),
        ("hx_one", lambda m: m(x, st(B, H)[:1])),
        ("hx_one_unbatched", lambda m: m(x[0], st(H)[:1])),
        ("hx_three_bad_input", lambda m: m(_x(B, I + 1), st(B, H) + st(B, H)[:1])),
        ("hx_tensor", lambda m: m(x, st(B, H)[0])),
    ] if is_lstm else [])


_CELL_CASES = [(k, n) for k in CELLS for n, _ in _cell_cases(k)]


@pytest.mark.parametrize("kind,case", _CELL_CASES, ids=[f"{k}-{n}" for k, n in _CELL_CASES])
def test_cell_errors_match_torch_nn(kind, case):
    _check_case(CELLS[kind], dict(_cell_cases(kind))[case])


def _same_results(ref_out, our_out):
    ref_t, our_t = _flatten(ref_out), _flatten(our_out)
    assert len(ref_t) == len(our_t)
    for a, b in zip(ref_t, our_t):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)  # float64, one short call


@pytest.mark.parametrize("case", ["lstm_three", "cell_three", "cell_tensor"])
def test_unbatched_lstm_states_taken_from_the_first_two(case):
    # torch.nn rebuilds an unbatched hx from hx[0] and hx[1], whatever else it holds
    ref = nn.LSTMCell(I, H, dtype=f64) if case.startswith("cell") else nn.LSTM(I, H, dtype=f64)
    ours = pyrnn.convert(ref)
    h = _x(1, H) if case == "lstm_three" else _x(H)
    hx = torch.stack([h, 2 * h]) if case == "cell_tensor" else (h, 2 * h, 3 * h)
    x = _x(T, I) if case == "lstm_three" else _x(I)
    _same_results(ref(x, hx), ours(x, hx))


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_modules_built_on_meta_then_materialised(kind):
    # to_empty and reset_parameters give new parameters: the module's list of weights
    # follows them (torch.nn's _apply), for the packed input's path as for the plain one
    mods = []
    for cls in (getattr(nn, kind), getattr(pyrnn, kind)):
        m = cls(I, H, num_layers=2, device="meta", dtype=f64)
        m.to_empty(device="cpu")
        torch.manual_seed(0)
        m.reset_parameters()
        mods.append(m)
    x = _x(T, B, I)
    for inp in (x, pack_padded_sequence(x, [5, 3, 2])):
        _same_results(mods[0](inp), mods[1](inp))


def test_dtype_conversion_by_swapping_parameters():
    ref = nn.GRU(I, H)
    ours = pyrnn.convert(nn.GRU(I, H))
    ours.load_state_dict(ref.state_dict())
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        ref, ours = ref.double(), ours.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    x = _x(T, B, I)
    _same_results(ref(x), ours(x))


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "lstm_proj", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_output_changed_in_place_before_backward(kind, layers):
    # out += x and an in-place activation after the module (torch.nn's graph keeps the
    # steps' states apart from the output; float64: torch.nn's LSTM off oneDNN)
    grads = []
    ref = MODULES[kind](num_layers=layers)
    for m in (ref, pyrnn.convert(ref)):
        x = _x(T, B, I).requires_grad_()
        out, _ = m(x)
        n = min(I, out.shape[-1])
        out[..., :n] += x[..., :n]
        torch.relu_(out)
        out.pow(2).sum().backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    _same_results(grads[0], grads[1])


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("batched", [True, False])
def test_cells_on_meta(kind, batched):
    # shapes and dtypes without data, as torch.nn's cells give them
    shapes = []
    for m in (CELLS[kind](), pyrnn.convert(CELLS[kind]())):
        m = m.to("meta")
        x = torch.empty((B, I) if batched else (I,), dtype=f64, device="meta")
        r = _flatten(m(x))
        assert all(t.device.type == "meta" for t in r)
        shapes.append([(t.shape, t.dtype) for t in r])
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_script(kind):
    # torch.jit.script compiles torch.nn's cell over the same parameters
    ref = CELLS[kind]()
    ours = pyrnn.convert(ref)
    scripted = torch.jit.script(ours)
    x, hx = _x(B, I), _state(kind.replace("_cell", ""), (B,), dtype=f64)
    _same_results(ref(x, hx), scripted(x, hx))
    out = scripted(x, hx)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


@pytest.mark.parametrize("kind", list(MODULES))
def test_modules_script_as_torch_nns(kind):
    # torch.nn's recurrent modules script without a callable forward; pyrnn's the same way
    for m in (MODULES[kind](), pyrnn.convert(MODULES[kind]())):
        scripted = torch.jit.script(m)
        with pytest.raises(AttributeError, match="has no attribute 'forward'"):
            scripted(_x(T, B, I))


@pytest.mark.parametrize("make", [lambda: pyrnn.LayerNormLSTMCell(I, H),
                                  lambda: pyrnn.RNNCell(I, H, nonlinearity="leaky_relu")])
def test_script_without_a_torch_nn_twin(make):
    with pytest.raises(NotImplementedError, match="no torch.nn counterpart"):
        torch.jit.script(make())


@pytest.mark.parametrize("kind", list(MODULES))
def test_dropout_set_out_of_range_after_construction(kind):
    # checked by ATen's dropout, in training between layers only
    def call(m):
        m.dropout = 1.5
        return m(_x(T, B, I))
    _check_case(lambda: MODULES[kind](num_layers=2), call)
    for layers, training in ((2, False), (1, True)):
        ref = MODULES[kind](num_layers=layers).train(training)
        ours = pyrnn.convert(MODULES[kind](num_layers=layers)).train(training)
        ours.load_state_dict(ref.state_dict())
        ref.dropout = ours.dropout = 1.5
        _same_results(ref(_x(T, B, I)), ours(_x(T, B, I)))


@pytest.mark.parametrize("c_dtype", [torch.float64, torch.float16, torch.int64])
def test_lstm_cell_state_of_another_dtype(c_dtype):
    # torch.nn's cell adds c_{t-1} into c_t in the dtype of both: h and c come back in
    # the promoted dtype (pyrnn computes in float32 and returns that dtype; float32
    # rounding of the cell state)
    ref = nn.LSTMCell(I, H)
    ours = pyrnn.convert(ref)
    x, h = _x(B, I).float(), _x(B, H).float()
    c = (3 * _x(B, H)).to(c_dtype)
    want, got = ref(x, (h, c)), ours(x, (h, c))
    for a, b in zip(want, got):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b.double(), a.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,proj,c_dtype,packed", [
    (f64, 0, torch.float32, False), (f64, 0, torch.float32, True), (f64, 0, torch.int64, False),
    (torch.float32, 2, torch.float16, False), (torch.float32, 2, torch.int64, False),
    (torch.float32, 0, torch.float16, True)])
def test_lstm_cell_state_promoted_to_the_parameters_dtype(dtype, proj, c_dtype, packed):
    # off oneDNN (float64, a projection, packed input) torch.nn's LSTM runs a cell state
    # of a dtype that promotes to the parameters' dtype, in that dtype
    ref = nn.LSTM(I, H, proj_size=proj, dtype=dtype)
    ours = pyrnn.convert(ref)
    x = _x(T, B, I).to(dtype)
    inp = pack_padded_sequence(x, [5, 3, 2]) if packed else x
    hx = (_x(1, B, proj or H).to(dtype), (3 * _x(1, B, H)).to(c_dtype))
    want, got = _flatten(ref(inp, hx)), _flatten(ours(inp, hx))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == f64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(want, got):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, **tol)


_COMPLEX_CASES = [(k, p) for k in ("rnn_tanh", "lstm", "lstm_proj", "gru") for p in (False, True)] \
    + [(k, False) for k in ("rnn_tanh_cell", "lstm_cell", "gru_cell")]


@pytest.mark.parametrize("kind,packed", _COMPLEX_CASES)
def test_complex_modules(kind, packed):
    # torch.nn's modules take complex dtypes; pyrnn runs them as the reference formulation
    # (the same formulas as torch.nn's, summed in another order)
    cell = kind.endswith("_cell")
    make = CELLS[kind] if cell else lambda: MODULES[kind](num_layers=2, bidirectional=True)
    ref = make().to(torch.complex128)
    ours = pyrnn.convert(ref)
    got = []
    for m in (ref, ours):
        x = _x(B, I) if cell else _x(T, B, I)
        # (torch's pack_padded_sequence has no complex gradient: the parameters' only)
        x = torch.complex(x, 0.5 * x.flip(0)).requires_grad_(not packed)
        inp = pack_padded_sequence(x, [5, 3, 2]) if packed else x
        out = _flatten(m(inp))[0]
        out.abs().pow(2).sum().backward()
        got.append([out] + ([] if packed else [x.grad]) + [p.grad for p in m.parameters()])
    for a, b in zip(*got):
        assert b.dtype == torch.complex128
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_complex_layer_with_fused_features():
    m = pyrnn.GRU(I, H, dtype=torch.complex64, bptt_clip=1.0)
    with pytest.raises(NotImplementedError, match="bptt_clip run in the fused kernels"):
        m(_x(T, B, I).to(torch.complex64))


def test_cell_unknown_nonlinearity_at_forward():
    # torch.nn.RNNCell accepts any nonlinearity in its constructor and raises at forward
    ref, ours = nn.RNNCell(I, H, nonlinearity="gelu"), pyrnn.RNNCell(I, H, nonlinearity="gelu")
    for m in (ref, ours):
        with pytest.raises(RuntimeError, match="Unknown nonlinearity: gelu"):
            m(torch.randn(B, I))


CTOR_CASES = [
    ("RNN", dict(proj_size=2)), ("GRU", dict(proj_size=2)), ("RNN", dict(proj_size=0)),
    ("RNN", dict(nonlinearity="gelu")), ("LSTM", dict(proj_size=-1)), ("LSTM", dict(proj_size=H)),
    ("GRU", dict(dropout=1.5)), ("LSTM", dict(dropout=-0.1)), ("RNN", dict(bias=1)),
    ("GRU", dict(batch_first=None)), ("LSTM", dict(num_layers=0)),
]


@pytest.mark.parametrize("cls,kw", CTOR_CASES, ids=[f"{c}-{k}" for c, k in CTOR_CASES])
def test_constructor_errors_match_torch_nn(cls, kw):
    ref_exc, _ = _outcome(lambda: getattr(nn, cls)(I, H, **kw))
    assert ref_exc is not None
    our_exc, _ = _outcome(lambda: getattr(pyrnn, cls)(I, H, **kw))
    _same_error(ref_exc, our_exc)


@pytest.mark.parametrize("args", [(0, H), (I, 0), (4.0, H), (I, -1)])
@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
def test_constructor_size_errors_match_torch_nn(cls, args):
    ref_exc, _ = _outcome(lambda: getattr(nn, cls)(*args))
    assert ref_exc is not None
    our_exc, _ = _outcome(lambda: getattr(pyrnn, cls)(*args))
    _same_error(ref_exc, our_exc)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "0.5", True])
def test_bptt_clip_rejected_at_construction_and_assignment(bad):
    with pytest.raises(ValueError, match=r"bptt_clip: expected a number >= 0"):
        pyrnn.LSTM(I, H, bptt_clip=bad)
    m = pyrnn.GRU(I, H)
    with pytest.raises(ValueError, match=r"bptt_clip: expected a number >= 0"):
        m.bptt_clip = bad
    assert m.bptt_clip == 0.0


def test_bptt_clip_rejected_by_the_op_at_forward():
    x, h = torch.randn(T, B, I), torch.zeros(B, H)
    with pytest.raises(ValueError, match=r"bptt_clip: expected a number >= 0"):
        pyrnn.ops.rnn_tanh(x, h, torch.randn(H, I), torch.randn(H, H), bptt_clip=-0.5)


@pytest.mark.parametrize("bad,match", [
    (PackedSequence(torch.randn(7, I, dtype=f64), torch.tensor([3, 2, 1])),
     r"batch_sizes sum to 6 but data has 7 rows"),
    (PackedSequence(torch.randn(6, I, dtype=f64), torch.tensor([1, 2, 3])),
     r"batch_sizes must be non-increasing"),
    (PackedSequence(torch.randn(3, I, dtype=f64), torch.tensor([3, 0])),
     r"batch_sizes must be positive"),
    (PackedSequence(torch.randn(6, I, dtype=f64), torch.tensor([3.0, 2.0, 1.0])),
     r"batch_sizes must be a 1-D int64 tensor"),
    (PackedSequence(torch.randn(6, I, dtype=f64), torch.tensor([3, 2, 1]), torch.tensor([0, 1]),
                    torch.tensor([0, 1])),
     r"sorted_indices must have shape \(3,\)"),
])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_malformed_packed_sequence(kind, bad, match):
    m = pyrnn.convert(MODULES[kind]())
    with pytest.raises(RuntimeError, match=match):
        m(bad)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_op_device_checks_on_every_tensor(kind):
    """A tensor on another device (meta selects the fake kernel) is rejected by the op,
    never answered with unwritten memory."""
    G = {"rnn_tanh": 1, "lstm": 4, "gru": 3}[kind]
    args = dict(input=torch.randn(T, B, I), hx=torch.zeros(B, H),
                cx=torch.zeros(B, H) if kind == "lstm" else None,
                weight_ih=torch.randn(G * H, I), weight_hh=torch.randn(G * H, H),
                bias_ih=torch.randn(G * H), bias_hh=torch.randn(G * H))
    for name in [k for k, v in args.items() if v is not None and k != "input"]:
        bad = dict(args)
        bad[name] = args[name].to("meta")
        with pytest.raises(RuntimeError, match=rf"{name}: expected device cpu \(the device of "
                                               rf"input\), got meta"):
            torch.ops.pyrnn.forward(kind, bad["input"], bad["hx"], bad["cx"], bad["weight_ih"],
                                    bad["weight_hh"], bad["bias_ih"], bad["bias_hh"], None, None,
                                    False, False, 0.0, None)
    with pytest.raises(RuntimeError, match="lengths: expected a CPU tensor, got device meta"):
        torch.ops.pyrnn.forward(kind, *[args[k] for k in ("input", "hx", "cx", "weight_ih",
                                                          "weight_hh", "bias_ih", "bias_hh")],
                                None, torch.full((B,), T).to("meta"), False, False, 0.0, None)


@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_hidden_size_zero(kind):
    ref = {"rnn_tanh_cell": nn.RNNCell, "rnn_relu_cell": nn.RNNCell, "lstm_cell": nn.LSTMCell,
           "gru_cell": nn.GRUCell}[kind](10, 0)
    ours = pyrnn.convert(ref)
    x = torch.randn(3, 10, requires_grad=True)
    out, ref_out = ours(x), ref(x)
    out, ref_out = (out, ref_out) if isinstance(out, tuple) else ((out,), (ref_out,))
    for a, b in zip(out, ref_out):
        assert a.shape == b.shape == (3, 0)
    sum(o.sum() for o in out).backward()
    torch.testing.assert_close(x.grad, torch.zeros(3, 10), rtol=0, atol=0)
    assert ours.weight_ih.grad.shape == ours.weight_ih.shape


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(MODULES) + list(CELLS))
def test_16_bit_modules(kind, dtype):
    """torch.nn runs float16 and bfloat16 modules on the CPU; pyrnn accepts them, runs them
    in float32 and returns its results in the module's dtype. Held to torch.nn's own error
    against a float64 run of the same weights (at most 2x, plus one rounding of the result
    to the 16-bit dtype, whose unit roundoff is eps/2)."""
    make = {**MODULES, **CELLS}[kind]
    ref64 = make()
    ref = make().to(dtype)
    ref.load_state_dict(ref64.state_dict())
    ref64.load_state_dict(ref.state_dict())  # the weights as rounded to the 16-bit dtype
    ours = pyrnn.convert(ref)
    is_cell = kind in CELLS
    x = torch.randn(B, I) if is_cell else torch.randn(T, B, I)
    x = x.to(dtype)
    outs, refs, exact = ours(x), ref(x), ref64(x.double())
    flat = lambda r: [t for t in (r if isinstance(r, tuple) else (r,)) for t in
                      (t if isinstance(t, tuple) else (t,))]
    eps = torch.finfo(dtype).eps
    for o, r, e in zip(flat(outs), flat(refs), flat(exact)):
        assert o.dtype == dtype and o.shape == r.shape
        assert _max_err(o, e) <= 2 * _max_err(r, e) + eps, (kind, _max_err(o, e), _max_err(r, e))
    loss = sum((t.float() * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum()
               for t in flat(outs))
    loss.backward()
    for p in ours.parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()


# ---- PyTorch's own samples for the recurrent modules (module_db) ------------------------

def _module_infos():
    from torch.testing._internal.common_modules import module_db
    wanted = {nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell}
    return [info for info in module_db if info.module_cls in wanted]


_INFOS = _module_infos()


def _flatten(r):
    if isinstance(r, PackedSequence):
        return [r.data]
    if isinstance(r, (tuple, list)):
        return [t for x in r for t in _flatten(x)]
    return [r]


def _to64(v):
    if isinstance(v, PackedSequence):
        return PackedSequence(v.data.detach().double(), v.batch_sizes, v.sorted_indices,
                              v.unsorted_indices)
    if isinstance(v, (tuple, list)):
        return type(v)(_to64(t) for t in v)
    return v.detach().double() if isinstance(v, torch.Tensor) else v


def _assert_calibrated(ours, ref, exact, dtype, input_scale):
    """float64: equal to round-off (1e-10). float32: pyrnn's error against a float64 run of
    torch.nn is at most twice torch.nn's own float32 error, plus 8 ulp of the largest value
    that enters the products (the result or the input: these samples draw inputs up to 9,
    and a dot product's rounding error scales with its terms, not its result; the two
    libraries order their sums differently, and torch.nn's error can be 0 by chance)."""
    if dtype == torch.float64:
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        return
    err, ref_err = _max_err(ours, exact), _max_err(ref, exact)
    scale = max(exact.abs().max().item() if exact.numel() else 0.0, input_scale)
    assert err <= 2 * ref_err + 8 * torch.finfo(dtype).eps * scale, (err, ref_err, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("info", _INFOS, ids=[i.name for i in _INFOS])
@pytest.mark.parametrize("training", [False, True])
def test_module_db_samples(info, dtype, training):
    """Every sample of torch.nn's ModuleInfo for the recurrent modules (packed ones too):
    pyrnn's module built with the same arguments and torch.nn's weights gives torch.nn's
    outputs and gradients (random cotangents), and torch.nn's reference for unbatched input."""
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                      training=training, with_packed_sequence=True)
    for s in samples:
        args, kwargs = s.constructor_input.args, s.constructor_input.kwargs
        ref = info.module_cls(*args, **kwargs, dtype=dtype)
        ours = getattr(pyrnn, info.module_cls.__name__)(*args, **kwargs, dtype=dtype)
        ours.load_state_dict(ref.state_dict())
        ref64 = info.module_cls(*args, **kwargs, dtype=torch.float64)
        ref64.load_state_dict(ref.state_dict())
        for m in (ref, ours, ref64):
            m.train(training)
        fwd = s.forward_input
        in64 = [_to64(a) for a in fwd.args]
        for t in _flatten(in64):
            t.requires_grad_(True)
        out_ref = ref(*fwd.args, **fwd.kwargs)
        out = ours(*fwd.args, **fwd.kwargs)
        out64 = ref64(*in64, **fwd.kwargs)
        flat_ref, flat, flat64 = _flatten(out_ref), _flatten(out), _flatten(out64)
        assert len(flat) == len(flat_ref)
        input_scale = max(t.abs().max().item() for t in _flatten(in64))
        for a, b, c in zip(flat, flat_ref, flat64):
            _assert_calibrated(a, b, c, dtype, input_scale)
        if s.reference_fn is not None and not isinstance(fwd.args[0], PackedSequence):
            # torch.nn's reference for unbatched input: the same module on a batch of one
            expected = s.reference_fn(ours, *fwd.args, **fwd.kwargs)
            for a, b in zip(flat, _flatten(expected)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        leaves = [t for t in _flatten(list(fwd.args)) if t.requires_grad]
        leaves64 = [t for t in _flatten(in64) if t.requires_grad]
        g = torch.Generator().manual_seed(0)
        cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in flat]
        grads_ref = torch.autograd.grad(flat_ref, leaves + list(ref.parameters()),
                                        [c.to(dtype) for c in cot], allow_unused=True)
        grads = torch.autograd.grad(flat, leaves + list(ours.parameters()),
                                    [c.to(dtype) for c in cot], allow_unused=True)
        grads64 = torch.autograd.grad(flat64, leaves64 + list(ref64.parameters()), cot,
                                      allow_unused=True)
        for a, b, c in zip(grads, grads_ref, grads64):
            assert (a is None) == (b is None)
            if a is not None:
                _assert_calibrated(a, b, c, dtype, input_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("info", _INFOS, ids=[i.name for i in _INFOS])
def test_module_db_error_inputs(info, dtype):
    """torch.nn's own error samples: the same exception type and message regex."""
    import re
    from torch.testing._internal.common_modules import ModuleErrorEnum
    errors = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                           training=False)
    assert errors
    cls = getattr(pyrnn, info.module_cls.__name__)
    for e in errors:
        mi = e.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        if e.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(e.error_type, match=e.error_regex):
                cls(*args, **kwargs)
        else:
            m = cls(*args, **kwargs)
            fwd = mi.forward_input
            with pytest.raises(e.error_type, match=re.compile(e.error_regex)):
                m(*fwd.args, **fwd.kwargs)
