"""The drop-in modules pyrnn.RNN, LSTM and GRU against torch.nn with shared weights."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import pyrnn

T, B, I, H = 5, 3, 4, 7  # small odd sizes
LENGTHS = torch.tensor([3, T, 1])  # unsorted, includes T and a length-1 sequence

CELLS = {
    "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
}


def make_pair(cell, input_size=I, hidden_size=H, dtype=torch.float64, **kw):
    """A torch.nn module and the pyrnn module of the same kind with its weights."""
    name, extra = CELLS[cell]
    ref = getattr(nn, name)(input_size, hidden_size, dtype=dtype, **extra, **kw)
    ours = getattr(pyrnn, name)(input_size, hidden_size, dtype=dtype, **extra, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def states(h):
    """The final state(s) as a list: [h_n] or [h_n, c_n]."""
    return list(h) if isinstance(h, tuple) else [h]


def make_hx(cell, num_layers, bidirectional, batch_shape, dtype=torch.float64):
    shape = (num_layers * (2 if bidirectional else 1), *batch_shape, H)
    if cell == "lstm":
        return tuple(torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(2))
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def forward_and_grads(module, inp, hx, leaves, cotangents=None):
    """Runs module; returns (output, final states, cotangents, gradients w.r.t. leaves and
    every parameter in named_parameters order). The differentiated outputs are the output
    (its .data when packed) and each final state; cotangents are drawn when not given."""
    out, h = module(inp) if hx is None else module(inp, hx)
    outs = [out.data if isinstance(out, PackedSequence) else out] + states(h)
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outs]
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(outs, list(leaves) + params, cotangents, retain_graph=True)
    return out, states(h), cotangents, grads


# float64 tolerances: both sides round every operation to ~1.1e-16 relative and differ only
# in summation order and in their exp/tanh (a few ulp each). Over at most T * num_layers = 15
# sequential steps with sums of at most 2H + H = 21 terms, and gradients summing T * B = 15
# rows, the accumulated difference stays below ~1e-14 relative to values of order 1-30, so
# rtol=1e-9 / atol=1e-11 is a margin of several orders while any wrong term (a missing
# bias, a swapped gate, a mis-ordered sequence) shows up at 1e-3 or more.
RTOL64, ATOL64 = 1e-9, 1e-11


def close64(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64)


FORMS = ["padded", "packed", "packed_sorted", "unbatched"]


@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 3], ids=["L1", "L3"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_parity_float64(cell, num_layers, bidirectional, batch_first, form, with_hx):
    ours, ref = make_pair(cell, num_layers=num_layers, bidirectional=bidirectional,
                          batch_first=batch_first)
    if form == "unbatched":
        x = torch.randn(T, I, dtype=torch.float64, requires_grad=True)
    elif batch_first:
        x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    else:
        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    inp = x
    if form == "packed":
        inp = pack_padded_sequence(x, LENGTHS, batch_first=batch_first, enforce_sorted=False)
    elif form == "packed_sorted":
        inp = pack_padded_sequence(x, LENGTHS.sort(descending=True).values,
                                   batch_first=batch_first, enforce_sorted=True)
    hx = None
    if with_hx:
        hx = make_hx(cell, num_layers, bidirectional, () if form == "unbatched" else (B,))
    leaves = [x] + ([] if hx is None else states(hx))

    out_ref, h_ref, cot, g_ref = forward_and_grads(ref, inp, hx, leaves)
    out, h, _, g = forward_and_grads(ours, inp, hx, leaves, cot)

    if isinstance(inp, PackedSequence):
        assert isinstance(out, PackedSequence)
        close64(out.data, out_ref.data)
        assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
        for a, b in [(out.sorted_indices, out_ref.sorted_indices),
                     (out.unsorted_indices, out_ref.unsorted_indices)]:
            assert (a is None and b is None) or torch.equal(a, b)
        padded, lengths = pad_packed_sequence(out, batch_first=batch_first)
        padded_ref, lengths_ref = pad_packed_sequence(out_ref, batch_first=batch_first)
        close64(padded, padded_ref)
        assert torch.equal(lengths, lengths_ref)
    else:
        assert out.shape == out_ref.shape
        close64(out, out_ref)
    assert len(h) == len(h_ref)
    for a, b in zip(h, h_ref):
        assert a.shape == b.shape
        close64(a, b)
    names = ["input"] + [f"hx[{i}]" for i in range(len(leaves) - 1)] + [
        n for n, _ in ref.named_parameters()]
    assert len(g) == len(g_ref) == len(names)
    for name, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_tied_lengths(cell):
    # Enough equal lengths that torch.sort permutes them: the results must still be
    # assigned to the right sequences.
    # The lengths are interleaved, so the sort must move sequences.
    lengths = torch.tensor([1, 3, 2, 3, 1, 2, 2, 3, 1, 2, 1, 2, 3, 1, 2, 2, 1])
    ours, ref = make_pair(cell, 2, 3)
    x = torch.randn(3, len(lengths), 2, dtype=torch.float64)
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    assert not torch.equal(inp.sorted_indices, torch.arange(len(lengths)))
    out, h = ours(inp)
    out_ref, h_ref = ref(inp)
    close64(out.data, out_ref.data)
    for a, b in zip(states(h), states(h_ref)):
        close64(a, b)


@pytest.mark.parametrize("cell", list(CELLS))
def test_parity_float32(cell):
    # float32, eps = 1.2e-7. Forward: states are O(1); each step's pre-activation is a dot
    # product of at most 2H = 34 terms (error ~sqrt(34) eps rms) and the kernels' own
    # exp/tanh are good to a few ulp, so one step differs by ~2 eps = 2.4e-7 at most. At
    # torch.nn's initialisation the recurrence does not amplify errors, so over the
    # T * layers = 40 sequential steps they add up at most linearly: 40 * 2.4e-7 ~ 1e-5.
    # Gradients: dLoss/dh flows back through the same 40 steps and every weight-gradient
    # entry sums T * B = 80 products (error ~sqrt(80) eps relative to the sum's scale),
    # so the bound is ~1e-5 relative to the largest entry of each gradient (up to ~30
    # here), not to each entry. Observed differences are ~2e-7 of that scale.
    T_, B_, I_, H_, L_ = 20, 4, 13, 17, 2
    ours, ref = make_pair(cell, I_, H_, dtype=torch.float32, num_layers=L_)
    x = torch.randn(T_, B_, I_, requires_grad=True)
    out_ref, h_ref, cot, g_ref = forward_and_grads(ref, x, None, [x])
    out, h, _, g = forward_and_grads(ours, x, None, [x], cot)
    for a, b in zip([out] + h, [out_ref] + h_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    names = ["input"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, bias=False, batch_first=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "L2_bi", "L3_nobias"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_state_dict_round_trip(cell, config):
    name, extra = CELLS[cell]
    kw = dict(extra, **config)
    ours = getattr(pyrnn, name)(I, H, **kw)
    ref = getattr(nn, name)(I, H, **kw)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for k in sd_ref:
        assert sd_ours[k].shape == sd_ref[k].shape, k
        assert sd_ours[k].dtype == sd_ref[k].dtype, k

    to_ref = getattr(nn, name)(I, H, **kw)
    to_ref.load_state_dict(sd_ours)
    for k, v in to_ref.state_dict().items():
        assert torch.equal(v, sd_ours[k]), k

    to_ours = getattr(pyrnn, name)(I, H, **kw)
    to_ours.load_state_dict(sd_ref)
    for k, v in to_ours.state_dict().items():
        assert torch.equal(v, sd_ref[k]), k

    x = torch.randn(B, T, I) if kw.get("batch_first") else torch.randn(T, B, I)
    with torch.no_grad():
        out, _ = to_ours(x)
        out_ref, _ = ref(x)
    # float32 over at most 15 sequential steps: see test_parity_float32 for the bound.
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "L2_bi", "L3_nobias"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_same_initialisation(cell, config, seed):
    name, extra = CELLS[cell]
    kw = dict(extra, **config)
    torch.manual_seed(seed)
    ours = getattr(pyrnn, name)(I, H, **kw)
    torch.manual_seed(seed)
    ref = getattr(nn, name)(I, H, **kw)
    p_ours, p_ref = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert list(p_ours) == list(p_ref)
    for k in p_ref:
        assert torch.equal(p_ours[k], p_ref[k]), k
        assert p_ours[k].requires_grad


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H, batch_first=True)
        self.body = nn.ModuleList([nn.GRU(H, H, num_layers=2, bidirectional=True,
                                          batch_first=True)])
        self.head = nn.Sequential(nn.Linear(2 * H, 3), nn.Tanh())

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.body[0](y)
        return self.head(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convert(dtype):
    model = _Net().to(dtype)
    model.body.eval()
    original = copy.deepcopy(model)
    x = torch.randn(B, T, I, dtype=dtype)

    converted = pyrnn.convert(model)
    assert converted is model
    assert type(model.lstm) is pyrnn.LSTM
    assert type(model.body[0]) is pyrnn.GRU
    assert type(model.head[0]) is nn.Linear
    assert model.training and model.lstm.training
    assert not model.body[0].training
    assert model.lstm.batch_first and model.body[0].bidirectional
    assert model.body[0].num_layers == 2
    for (k, v), (k0, v0) in zip(model.state_dict().items(), original.state_dict().items()):
        assert k == k0 and v.dtype == dtype and torch.equal(v, v0)

    tol = dict(rtol=RTOL64, atol=ATOL64) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), original(x), **tol)
    model.eval()
    original.eval()
    torch.testing.assert_close(model(x), original(x), **tol)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("kw", [{}, {"record_grad_norms": True, "bptt_clip": 0.1}],
                         ids=["plain", "recorded_clipped"])
def test_output_changed_in_place_same_bits(cell, kw):
    # a backward that finds its output changed runs the forward again: the same bits as
    # when the output is left alone, for the gradients and the recorded norms
    name, extra = CELLS[cell]
    m = getattr(pyrnn, name)(I, H, **extra, **kw)
    got = []
    for in_place in (False, True):
        x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out, _ = m(x)
        out = out.mul_(1.5) if in_place else out * 1.5
        out.pow(2).sum().backward()
        norms = [m.grad_norms.hidden.clone()] if kw else []
        got.append([x.grad] + [p.grad.clone() for p in m.parameters()] + norms)
        m.zero_grad()
    for a, b in zip(*got):
        assert torch.equal(a, b)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(I, H, dtype=torch.float64)
        self.again = self.rnn  # one module, held twice
        self.cell = nn.GRUCell(H, H, dtype=torch.float64)

    def forward(self, x):
        y = self.again(self.rnn(x)[0][:, :, :I])[0]
        return self.cell(y[-1])


def test_convert_keeps_the_objects():
    model = _Shared()
    original = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion
    calls = []
    model.rnn.register_forward_hook(lambda *args: calls.append(1))
    model.rnn.note = "kept"
    rnn, cell = model.rnn, model.cell
    pyrnn.convert(model)
    assert model.rnn is rnn and model.again is rnn and model.cell is cell
    assert type(rnn) is pyrnn.LSTM and type(cell) is pyrnn.GRUCell
    assert rnn.note == "kept" and rnn.bptt_clip == 0.0 and not rnn.record_grad_norms
    assert all(a is b for a, b in zip(model.parameters(), params))
    x = torch.randn(T, B, I, dtype=torch.float64)
    close64(model(x), original(x))
    assert calls == [1, 1]
    model(x).sum().backward()
    opt.step()  # the optimizer trains the converted module's parameters
    assert not torch.equal(model.rnn.weight_hh_l0, original.rnn.weight_hh_l0)
    back = pyrnn.to_torch(model)
    assert back is model and type(model.rnn) is nn.LSTM and model.again is model.rnn
    assert "_bptt_clip" not in model.rnn.__dict__


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_convert_inside_a_model_with_norm_hooks(norm):
    # the norms' forward pre-hooks set weight_hh_l0 from their own parameters
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(I, H, dtype=torch.float64))
    getattr(nn.utils, norm)(model[0], "weight_hh_l0")
    model.eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    want = model(x)[0]
    pyrnn.convert(model)
    assert type(model[0]) is pyrnn.LSTM
    close64(model(x)[0], want)


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal"])
def test_convert_parametrized_modules(kind):
    # torch.nn.utils.parametrize gives a module a class of its own over torch.nn's: the
    # conversion gives it one over pyrnn's, with the same parametrizations
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(I, H, dtype=torch.float64), nn.GRUCell(H, H, dtype=torch.float64))
    for m, name in ((model[0], "weight_hh_l0"), (model[1], "weight_hh")):
        getattr(nn.utils.parametrizations, kind)(m, name)
    original = copy.deepcopy(model)
    pyrnn.convert(model)
    assert isinstance(model[0], pyrnn.LSTM) and isinstance(model[1], pyrnn.GRUCell)
    assert parametrize.is_parametrized(model[0], "weight_hh_l0")
    x = torch.randn(T, B, I, dtype=torch.float64)
    got = model[1](model[0](x)[0][-1])
    want = original[1](original[0](x)[0][-1])
    close64(got, want)
    got.sum().backward()
    want.sum().backward()
    for p, q in zip(model.parameters(), original.parameters()):
        close64(p.grad, q.grad)
    parametrize.remove_parametrizations(model[0], "weight_hh_l0")
    assert type(model[0]) is pyrnn.LSTM
    pyrnn.to_torch(model)
    assert type(model[0]) is nn.LSTM and isinstance(model[1], nn.GRUCell)
    assert not isinstance(model[1], pyrnn.GRUCell)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("training", [True, False])
def test_convert_bare_module(cell, training):
    name, extra = CELLS[cell]
    m = getattr(nn, name)(I, H, num_layers=2, dropout=0.25, dtype=torch.float64, **extra)
    m.train(training)
    new = pyrnn.convert(m)
    assert type(new) is getattr(pyrnn, name)
    assert new.training == training
    assert new.dropout == 0.25
    if cell.startswith("rnn"):
        assert new.nonlinearity == m.nonlinearity
    x = torch.randn(T, B, I, dtype=torch.float64)
    new.eval()
    m.eval()
    close64(new(x)[0], m(x)[0])


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_draws_torch_nns_masks(cell, packed):
    # the same seed gives torch.nn's masks (over the packed rows for packed input, in
    # their order) and leaves the generator where torch.nn leaves it
    ours, ref = make_pair(cell, num_layers=3, dropout=0.4, bidirectional=True)
    got = []
    for m in (ref, ours):
        x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        torch.manual_seed(5)
        inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
        out, _ = m(inp)
        out = out.data if packed else out
        out.pow(2).sum().backward()
        got.append((out, x.grad, torch.rand(3)))
    for a, b in zip(*got):
        close64(b, a)


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout(cell):
    ours, ref = make_pair(cell, num_layers=2, dropout=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    ours.eval()
    ref.eval()
    out_eval, h_eval = ours(x)
    out_ref, h_ref = ref(x)
    close64(out_eval, out_ref)
    for a, b in zip(states(h_eval), states(h_ref)):
        close64(a, b)

    # In training, pyrnn draws its dropout masks as torch.nn does (one dropout call on
    # each layer's output but the last, in order), so from the same seed the outputs and
    # gradients are torch.nn's; a missing or misplaced mask changes them.
    ours.train()
    ref.train()
    xg = x.clone().requires_grad_()
    torch.manual_seed(11)
    out, _ = ours(xg)
    torch.manual_seed(11)
    out_ref, _ = ref(xg)
    close64(out, out_ref)
    assert not torch.allclose(out, out_eval)
    cot = torch.randn_like(out)
    g = torch.autograd.grad(out, [xg] + list(ours.parameters()), cot)
    g_ref = torch.autograd.grad(out_ref, [xg] + list(ref.parameters()), cot)
    for a, b in zip(g, g_ref):
        close64(a, b)


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_inactive_with_one_layer(cell):
    ours, ref = make_pair(cell, num_layers=1)
    ours.dropout = ref.dropout = 0.5
    x = torch.randn(T, B, I, dtype=torch.float64)
    close64(ours(x)[0], ref(x)[0])


def _op_args(mode, dtype=torch.float32):
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[mode]
    x = torch.randn(T, B, I, dtype=dtype)
    hx = torch.zeros(B, H, dtype=dtype)
    cx = torch.zeros(B, H, dtype=dtype) if mode == "lstm" else None
    w_ih, w_hh = torch.randn(G * H, I, dtype=dtype), torch.randn(G * H, H, dtype=dtype)
    b_ih, b_hh = torch.randn(G * H, dtype=dtype), torch.randn(G * H, dtype=dtype)
    return x, hx, cx, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("mode", list(CELLS))
def test_op_rejects_float16_on_cpu(mode):
    args = _op_args(mode, torch.float16)
    with pytest.raises(TypeError, match=r"input: expected dtype float32 or float64, got Half"):
        torch.ops.pyrnn.forward(mode, *args, None, None, False, False, 0.0, None)


@pytest.mark.parametrize("bad", [T + 1, -1])
def test_op_rejects_lengths_out_of_range(bad):
    args = _op_args("lstm")
    lengths = torch.tensor([T, bad, 1])
    with pytest.raises(ValueError, match=rf"lengths: expected values in \[0, T = {T}\]"):
        torch.ops.pyrnn.forward("lstm", *args, None, lengths, False, False, 0.0, None)


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.zeros(2, T, B + 1), ValueError, rf"norm_out: expected shape \[2, {T}, {B}\], got \[2, {T}, {B + 1}\]"),
    (torch.zeros(2, T, B, dtype=torch.int32), TypeError, r"norm_out: expected a floating-point"),
])
def test_op_rejects_bad_norm_out(bad, exc, msg):
    args = _op_args("gru")
    with pytest.raises(exc, match=msg):
        torch.ops.pyrnn.forward("gru", *args, None, None, False, False, 0.0, bad)


@pytest.mark.parametrize("form", ["padded", "packed", "unbatched"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 3], ids=["L1", "L3"])
def test_proj_size_parity_float64(num_layers, bidirectional, with_hx, form):
    P = 3
    ours, ref = make_pair("lstm", num_layers=num_layers, bidirectional=bidirectional,
                          proj_size=P, batch_first=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(*((T, I) if form == "unbatched" else (B, T, I)), dtype=torch.float64,
                    requires_grad=True)
    inp = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False) \
        if form == "packed" else x
    hx = None
    if with_hx:
        D = 2 if bidirectional else 1
        batch = () if form == "unbatched" else (B,)
        hx = (torch.randn(num_layers * D, *batch, P, dtype=torch.float64, requires_grad=True),
              torch.randn(num_layers * D, *batch, H, dtype=torch.float64, requires_grad=True))
    leaves = [x] + ([] if hx is None else list(hx))
    out_ref, h_ref, cot, g_ref = forward_and_grads(ref, inp, hx, leaves)
    out, h, _, g = forward_and_grads(ours, inp, hx, leaves, cot)
    close64(out.data if form == "packed" else out, out_ref.data if form == "packed" else out_ref)
    for a, b in zip(h + list(g), h_ref + list(g_ref)):
        assert a.shape == b.shape
        close64(a, b)


@pytest.mark.parametrize("case", ["bidirectional", "packed", "projected"])
def test_module_gradcheck(case):
    # float64 gradcheck through whole modules: two layers, and the path under test
    kw = dict(num_layers=2, dtype=torch.float64)
    kw.update({"bidirectional": dict(bidirectional=True), "packed": dict(bidirectional=True),
               "projected": dict(proj_size=2, bidirectional=True)}[case])
    m = pyrnn.LSTM(3, 4, **kw)
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
                m, {n: p for (n, _), p in zip(m.named_parameters(), ps)}):
            inp = pack_padded_sequence(x, torch.tensor([2, 4, 1]), enforce_sorted=False) \
                if case == "packed" else x
            out, (h, c) = m(inp)
        return (out.data if case == "packed" else out), h, c

    assert torch.autograd.gradcheck(f, [x] + params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_no_grad_matches_grad(cell, form):
    ours, _ = make_pair(cell, num_layers=2, bidirectional=True)
    x = torch.randn(T, I, dtype=torch.float64) if form == "unbatched" else torch.randn(
        T, B, I, dtype=torch.float64)
    inp = x
    if form == "packed":
        inp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    elif form == "packed_sorted":
        inp = pack_padded_sequence(x, LENGTHS.sort(descending=True).values)
    out, h = ours(inp)
    with torch.no_grad():
        out_ng, h_ng = ours(inp)
    with torch.inference_mode():
        out_inf, h_inf = ours(inp)
    if isinstance(inp, PackedSequence):
        out, out_ng, out_inf = out.data, out_ng.data, out_inf.data
    assert out.requires_grad and not out_ng.requires_grad and not out_inf.requires_grad
    for a, b, c in zip([out] + states(h), [out_ng] + states(h_ng), [out_inf] + states(h_inf)):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=0)
        torch.testing.assert_close(c, a.detach(), rtol=0, atol=0)


class _Spy:
    """Stands in for pyrnn._C in pyrnn.modules: records what module_forward returned."""

    def __init__(self, real):
        self._real = real
        self.results = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def module_forward(self, *args):
        result = self._real.module_forward(*args)
        self.results.append(result)
        return result


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(pyrnn.modules._C)
    monkeypatch.setattr(pyrnn.modules, "_C", s)
    return s


PLAIN_CASES = [
    ("rnn_tanh", {}, True, False), ("rnn_relu", {"num_layers": 2}, False, True),
    ("lstm", {"num_layers": 2, "bidirectional": True}, True, True),
    ("lstm", {"proj_size": 3, "batch_first": True}, True, False),
    ("lstm", {"bias": False}, False, False), ("gru", {"bidirectional": True}, True, False),
    ("gru", {"num_layers": 2, "batch_first": True, "dropout": 0.5}, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cell,kw,with_hx,grad", PLAIN_CASES)
def test_plain_call_takes_compiled_forward_with_same_bits(spy, cell, kw, with_hx, grad, batched,
                                                          dtype):
    """A plain call runs the compiled forward (csrc/autograd.cpp), which calls the same op
    with the same arguments as the Python forward: the same bits, gradients included, and
    torch.nn's results (dropout is inactive in eval mode)."""
    ours, ref = make_pair(cell, dtype=dtype, **kw)
    ours.eval(), ref.eval()
    shape = ((B, T) if kw.get("batch_first") else (T, B)) if batched else (T,)
    x = torch.randn(*shape, I, dtype=dtype, requires_grad=grad)
    hx = None
    if with_hx:
        D, L = 2 if kw.get("bidirectional") else 1, kw.get("num_layers", 1)
        P = kw.get("proj_size", 0) or H
        hshape = (L * D, B) if batched else (L * D,)
        hx = torch.randn(*hshape, P, dtype=dtype, requires_grad=grad)
        if cell == "lstm":
            hx = (hx, torch.randn(*hshape, H, dtype=dtype, requires_grad=grad))
    runs = []
    for compiled in (True, False):
        ours._compiled_forward = compiled
        spy.results.clear()
        with torch.set_grad_enabled(grad):
            out, h = ours(x, hx)
        assert (len(spy.results) == 1 and spy.results[0] is not None) if compiled \
            else not spy.results
        outs = [out] + states(h)
        grads = []
        if grad:
            leaves = [x] + list(hx if isinstance(hx, tuple) else [hx] if hx is not None else [])
            leaves += list(ours.parameters())
            cot = [torch.ones_like(o) for o in outs]
            grads = torch.autograd.grad(outs, leaves, cot)
        else:
            assert all(o.grad_fn is None for o in outs)
        runs.append((outs, grads))
    for a, b in zip(runs[0][0] + list(runs[0][1]), runs[1][0] + list(runs[1][1])):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    if dtype == torch.float64:  # the tolerances of the float64 comparisons above
        with torch.set_grad_enabled(grad):
            ref_outs = [ref(x, hx)[0]] + states(ref(x, hx)[1])
        for a, b in zip(runs[0][0], ref_outs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


class _NoOpFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _NoOpDispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def _other_calls():
    """(name, make) pairs: make() -> (module, call), a call the compiled forward declines."""
    x = torch.randn(T, B, I)

    def mod(cell="lstm", **kw):
        return make_pair(cell, dtype=torch.float32, **kw)[0]

    def case(module_fn, *args, context=None):
        """module_fn() called on args() (the input by default), inside context() if given."""
        def make():
            m = module_fn()

            def call():
                if context is None:
                    return m(*(args[0]() if args else (x,)))
                with context():
                    return m(*(args[0]() if args else (x,)))
            return m, call
        return make

    def with_settings(**settings):
        def module():
            m = mod()
            for k, v in settings.items():
                setattr(m, k, v)
            return m
        return module

    def parametrized():
        m = mod()
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", nn.Identity())
        return m

    zeros = torch.zeros(1, B, H)
    return [
        ("record_grad_norms", case(with_settings(record_grad_norms=True))),
        ("record_gate_stats", case(with_settings(record_gate_stats=True))),
        ("dropout while training", case(lambda: mod(num_layers=2, dropout=0.5).train())),
        ("packed", case(mod, lambda: (pack_padded_sequence(x, LENGTHS, enforce_sorted=False),))),
        ("autocast", case(mod, context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))),
        ("torch function mode", case(mod, context=_NoOpFunctionMode)),
        ("torch dispatch mode", case(mod, context=_NoOpDispatchMode)),
        ("float16 module", case(lambda: mod().half(), lambda: (x.half(),))),
        ("float64 input", case(mod, lambda: (x.double(),))),
        ("subclass input", case(mod, lambda: (x.as_subclass(_Sub),))),
        ("parametrization", case(parametrized)),
        ("hx of the wrong batch", case(mod, lambda: (x, (torch.zeros(1, B + 1, H),) * 2))),
        ("hx a list", case(mod, lambda: (x, [zeros, zeros]))),
        ("hx float64", case(mod, lambda: (x, (zeros.double(), zeros.double())))),
        ("hx a subclass", case(lambda: mod("gru"), lambda: (x, zeros.as_subclass(_Sub)))),
        ("hx 2-D for batched input", case(lambda: mod("gru"), lambda: (x, zeros[0]))),
        ("input on meta", case(mod, lambda: (x.to("meta"),))),
        ("input 4-D", case(mod, lambda: (x.unsqueeze(0),))),
        ("wrong input size", case(mod, lambda: (x[..., :-1],))),
        ("empty sequence", case(mod, lambda: (x[:0],))),
        ("LayerNormLSTM", case(lambda: pyrnn.LayerNormLSTM(I, H))),
    ]


@pytest.mark.parametrize("name,make", _other_calls(), ids=[n for n, _ in _other_calls()])
def test_other_calls_take_python_forward(spy, name, make):
    """Every call that is not plain goes to the Python forward (its checks, messages and
    features): the compiled forward declines it (returns None) or is not asked. The
    outcome, result or exception, is the Python forward's alone."""
    m, call = make()
    outcome = []
    for compiled in (True, False):
        m._compiled_forward = compiled
        spy.results.clear()
        try:
            result = call()
            outcome.append(("ok", [t.dtype for t in torch.utils._pytree.tree_leaves(result)
                                   if isinstance(t, torch.Tensor)]))
        except Exception as exc:  # noqa: BLE001 (the exception is what is compared)
            outcome.append((type(exc), str(exc)))
        assert all(r is None for r in spy.results), name
    assert outcome[0] == outcome[1]


CELL_CLASSES = {"rnn_tanh": ("RNNCell", {}), "rnn_relu": ("RNNCell", {"nonlinearity": "relu"}),
                "lstm": ("LSTMCell", {}), "gru": ("GRUCell", {})}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("cell", list(CELL_CLASSES))
def test_cell_step_takes_compiled_forward_with_same_bits(spy, cell, with_hx, batched, bias):
    """A plain cell step runs as a one-step layer in the compiled forward: the same bits
    as the cell's Python step, gradients included, and torch.nn's cell's results."""
    name, kw = CELL_CLASSES[cell]
    ref = getattr(nn, name)(I, H, bias=bias, dtype=torch.float64, **kw)
    ours = pyrnn.convert(ref)
    x = torch.randn(*((B,) if batched else ()), I, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        shape = (B, H) if batched else (H,)
        hx = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        if cell == "lstm":
            hx = (hx, torch.randn(shape, dtype=torch.float64, requires_grad=True))
    runs = []
    for compiled in (True, False):
        ours._compiled_forward = compiled
        spy.results.clear()
        out = ours(x, hx)
        assert (len(spy.results) == 1 and spy.results[0] is not None) if compiled \
            else not spy.results
        outs = list(out) if isinstance(out, tuple) else [out]
        leaves = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
        grads = torch.autograd.grad(outs, leaves + list(ours.parameters()),
                                    [torch.ones_like(o) for o in outs])
        runs.append(outs + list(grads))
    for a, b in zip(*runs):
        assert a.shape == b.shape and torch.equal(a, b)
    expected = ref(x, hx)
    for a, b in zip(runs[0], list(expected) if isinstance(expected, tuple) else [expected]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)  # the float64 tolerances above


@pytest.mark.parametrize("name,hx_fn", [
    ("hx a list", lambda: [torch.zeros(B, H), torch.zeros(B, H)]),
    ("hx of the wrong batch", lambda: (torch.zeros(B + 1, H), torch.zeros(B + 1, H))),
    ("hx float64", lambda: (torch.zeros(B, H, dtype=torch.float64),) * 2),
    ("hx 3-D", lambda: (torch.zeros(1, B, H),) * 2),
])
def test_other_cell_steps_take_python_step(spy, name, hx_fn):
    """A cell step the compiled forward cannot take plainly ends as the Python step does
    (its result or torch.nn's exception), the compiled forward giving no result."""
    cell = pyrnn.LSTMCell(I, H)
    x = torch.randn(B, I)
    outcome = []
    for compiled in (True, False):
        cell._compiled_forward = compiled
        spy.results.clear()
        try:
            outcome.append(("ok", [t.shape for t in cell(x, hx_fn())]))
        except Exception as exc:  # noqa: BLE001 (the exception is what is compared)
            outcome.append((type(exc), str(exc)))
        assert all(r is None for r in spy.results), name
    assert outcome[0] == outcome[1]
