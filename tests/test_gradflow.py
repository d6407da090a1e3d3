"""Per-step gradient norms recorded inside BPTT, in-BPTT clipping, and the analysis API."""
import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyrnn
from pyrnn import gradflow, ops, reference
from conftest import HAS_CELL, MODES, call_op, make_layer_args

# float64 throughout: the kernel's norms and the reference's differ only by rounding
# (~1e-16 relative per operation, a few hundred operations deep), so 1e-10 is tight.
TOL = dict(rtol=1e-10, atol=1e-12)


def _reference_norms(steps, T, B):
    h = torch.zeros(T, B, dtype=torch.float64)
    c = torch.zeros(T, B, dtype=torch.float64)
    for s in steps:
        m = s["mask"].to(torch.float64)
        h[s["t"]] = s["h"].grad.norm(dim=1) * m
        if s["c"] is not None:
            c[s["t"]] = s["c"].grad.norm(dim=1) * m
    return h, c


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("use_lengths", [False, True])
def test_op_norms_match_reference(mode, reverse, use_lengths):
    T, B = 7, 3
    args = make_layer_args(mode, T, B, 4, 6)
    lengths = torch.tensor([7, 2, 5]) if use_lengths else None
    norms = torch.full((2, T, B), -1.0, dtype=torch.float64)  # every slot is overwritten
    out = call_op(ops, mode, *args, lengths=lengths, reverse=reverse, norm_out=norms)
    steps = []
    ref = call_op(reference, mode, *args, lengths=lengths, reverse=reverse, steps=steps)
    gen = torch.Generator().manual_seed(5)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in out if o is not None]
    torch.autograd.backward([o for o in out if o is not None], cot)
    torch.autograd.backward([o for o in ref if o is not None], cot)
    h, c = _reference_norms(steps, T, B)
    torch.testing.assert_close(norms[0], h, **TOL)
    if HAS_CELL[mode]:
        torch.testing.assert_close(norms[1], c, **TOL)
    else:
        assert torch.all(norms[1] == 0)
    assert norms[0].min() >= 0 and norms[0].max() > 0


def _module_reference_norms(m, x, lengths, h0, cot_out):
    """Per-layer, per-direction reference norms from the reference's layer stack sharing m's
    weights."""
    T, B = x.shape[0], x.shape[1]
    D = 2 if m.bidirectional else 1
    weights = [tuple(m._weights(layer, d)) + (m._cell_weight(layer, d),)
               for layer in range(m.num_layers) for d in range(D)]
    steps = []
    out, _, _ = reference.stack(m._cell_mode, x, h0, h0 if m.mode == "LSTM" else None, weights,
                                lengths, m.bidirectional, params=m._cell_params(), steps=steps)
    out.backward(cot_out)
    hs, cs = zip(*(_reference_norms(s, T, B) for s in steps))
    return torch.stack(hs), torch.stack(cs)


MODULES = [(pyrnn.RNN, {}), (pyrnn.RNN, {"nonlinearity": "relu"}),
           (pyrnn.RNN, {"nonlinearity": "leaky_relu", "negative_slope": 0.2}),
           (pyrnn.LSTM, {}), (pyrnn.GRU, {}), (pyrnn.LayerNormLSTM, {})]


@pytest.mark.parametrize("cls,kw", MODULES)
@pytest.mark.parametrize("layers,bidirectional,packed",
                         [(1, False, False), (2, False, False), (2, True, False), (2, True, True)])
def test_module_norms_match_reference(cls, kw, layers, bidirectional, packed):
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 4, 5
    m = cls(I, H, num_layers=layers, bidirectional=bidirectional, dtype=torch.float64,
            record_grad_norms=True, **kw)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 4]) if packed else None
    D = 2 if bidirectional else 1
    h0 = torch.zeros(layers * D, B, H, dtype=torch.float64)
    if packed:
        out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
        out, _ = pad_packed_sequence(out)
    else:
        out, _ = m(x)
    cot = torch.randn_like(out)
    if packed:  # padded positions carry no gradient in either path
        cot = cot * (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)
    out.backward(cot)
    rec = m.grad_norms
    assert rec.hidden.shape == (layers * D, T, B)
    h, c = _module_reference_norms(m, x, lengths, h0, cot)
    torch.testing.assert_close(rec.hidden, h, **TOL)
    if m.mode == "LSTM":  # pyrnn.LSTM and LayerNormLSTM
        torch.testing.assert_close(rec.cell, c, **TOL)
    else:
        assert rec.cell is None
    if packed:
        assert torch.all(rec.hidden[:, 1:, 1] == 0)  # padded steps of the length-1 sequence


def test_recording_off_records_nothing():
    m = pyrnn.LSTM(3, 4)
    m(torch.randn(5, 2, 3))[0].sum().backward()
    assert m.grad_norms is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_clipping_matches_reference_hooks(mode, reverse):
    # large weights so that gate gradients exceed the clip value
    args = make_layer_args(mode, 6, 3, 4, 5, scale=1.5)
    lengths = torch.tensor([6, 3, 5])
    clip = 0.05
    out = call_op(ops, mode, *args, lengths=lengths, reverse=reverse, bptt_clip=clip)
    ref = call_op(reference, mode, *args, lengths=lengths, reverse=reverse, bptt_clip=clip)
    plain = call_op(ops, mode, *args, lengths=lengths, reverse=reverse)
    inputs = [a for a in args if a is not None]
    gen = torch.Generator().manual_seed(3)
    outs = [o for o in out if o is not None]
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64) * 10 for o in outs]
    g1 = torch.autograd.grad(outs, inputs, cot)
    g2 = torch.autograd.grad([o for o in ref if o is not None], inputs, cot)
    g3 = torch.autograd.grad([o for o in plain if o is not None], inputs, cot)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL)
    assert max((a - b).abs().max().item() for a, b in zip(g1, g3)) > 1e-3  # clipping acts


def test_analysis_on_known_curves():
    T = 50
    t = torch.arange(T, dtype=torch.float64)
    vanishing = 0.8 ** (T - 1 - t)  # shrinks by 0.8 per step back from the loss
    s = gradflow.analyse(vanishing)
    assert s.decay_rate == pytest.approx(0.8, rel=1e-12)
    assert s.half_life == pytest.approx(math.log(0.5) / math.log(0.8), rel=1e-12)
    assert s.first_last_ratio == pytest.approx(0.8 ** 49, rel=1e-9)
    assert s.flag == gradflow.VANISHING
    exploding = gradflow.analyse(1.2 ** (T - 1 - t))
    assert exploding.decay_rate == pytest.approx(1.2, rel=1e-12)
    assert exploding.half_life == math.inf and exploding.flag == gradflow.EXPLODING
    assert gradflow.analyse(torch.ones(T)).flag == gradflow.STABLE
    # batch dimension and zero (padded) steps
    batch = torch.stack([vanishing, vanishing * 2], 1)
    batch[:3] = 0
    assert gradflow.decay_rate(batch) == pytest.approx(0.8, rel=1e-12)


def test_analyse_module():
    m = pyrnn.GRU(3, 8, num_layers=2, bidirectional=True, record_grad_norms=True)
    out, _ = m(torch.randn(20, 4, 3))
    out[-1].pow(2).sum().backward()
    stats = gradflow.analyse_module(m)
    assert set(stats) == {"l0", "l0_reverse", "l1", "l1_reverse"}
    # each entry is the analysis of that layer and direction's recorded norms
    for k, name in enumerate(["l0", "l0_reverse", "l1", "l1_reverse"]):
        expected = gradflow.analyse(m.grad_norms.hidden[k])
        assert stats[name] == expected, (name, stats[name], expected)


def test_analysis_of_a_dead_gradient():
    s = gradflow.analyse(torch.zeros(10))
    assert s.first_last_ratio == 0.0 and s.flag == gradflow.VANISHING


def test_record_lifecycle():
    torch.manual_seed(0)
    m = pyrnn.LSTM(3, 4, num_layers=2, record_grad_norms=True)
    out, (h, c) = m(torch.randn(6, 2, 3))
    assert m.grad_norms is None  # forward only: nothing recorded yet
    h[0].sum().backward()  # the loss depends on layer 0 only: layer 1's gradient is zero
    rec = m.grad_norms
    assert torch.all(rec.hidden[1] == 0) and torch.all(rec.cell[1] == 0)
    assert torch.all(rec.hidden[0] > 0)
    kept = rec.hidden.clone()
    with torch.no_grad():
        m(torch.randn(9, 5, 3))  # evaluation keeps the last record
    torch.testing.assert_close(m.grad_norms.hidden, kept, rtol=0, atol=0)
    out, _ = m(torch.randn(3, 1, 3))
    out.sum().backward()
    assert m.grad_norms.hidden.shape == (2, 3, 1)
    assert torch.equal(rec.hidden, kept)  # a record is a copy, not a view of the store
    m.record_grad_norms = False
    out, _ = m(torch.randn(3, 1, 3))
    out.sum().backward()
    assert m.grad_norms.hidden.shape == (2, 3, 1)  # recording off: the last record stays


def _reference_gate_stats(mode, steps, T, B, params=()):
    """The statistics, from the reference's per-step gates, by the documented rules."""
    out = torch.zeros(2, T, B, dtype=torch.float64)
    for s in steps:
        g, h = s["gate"], s["h"].detach()
        if mode in ("lstm", "ln_lstm"):  # the forget gate
            factor, sat = g, (g < 0.05) | (g > 0.95)
        elif mode == "gru":
            factor, sat = 1 - g, (g < 0.05) | (g > 0.95)
        elif mode == "rnn_tanh":
            factor, sat = 1 - h ** 2, h.abs() > 0.95
        elif mode == "rnn_leaky_relu":  # derivative 1, or the slope at and below zero
            factor, sat = (h > 0).double() + params[0] * (h <= 0).double(), h <= 0
        else:
            factor, sat = (h > 0).double(), h == 0
        m = s["mask"].double()
        out[0, s["t"]] = factor.detach().mean(1) * m
        out[1, s["t"]] = sat.double().mean(1) * m
    return out


@pytest.mark.parametrize("cls,kw", MODULES)
@pytest.mark.parametrize("grad", [False, True])
def test_gate_stats_match_reference(cls, kw, grad):
    # two layers, bidirectional, packed: every indexing path of the record
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 4, 5
    m = cls(I, H, num_layers=2, bidirectional=True, dtype=torch.float64,
            record_gate_stats=True, **kw)
    with torch.no_grad():  # large weights, so that some units saturate
        for p in m.parameters():
            p.mul_(6)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([4, 6, 1])
    with torch.set_grad_enabled(grad):
        m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    rec = m.gate_stats
    mode = m._cell_mode
    weights = [[None if w is None else w.detach()
                for w in list(m._weights(layer, d)) + [m._cell_weight(layer, d)]]
               for layer in range(2) for d in range(2)]
    h0 = torch.zeros(4, B, H, dtype=torch.float64)
    steps = []
    reference.stack(mode, x, h0, h0 if m.mode == "LSTM" else None, weights, lengths, True,
                    params=m._cell_params(), steps=steps)
    expected = [_reference_gate_stats(mode, s, T, B, m._cell_params()) for s in steps]
    expected = torch.stack(expected)
    # the same float64 gates up to rounding; a unit within rounding of a saturation
    # threshold could flip, which these random weights do not hit
    torch.testing.assert_close(rec.factor, expected[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rec.saturated, expected[:, 1], rtol=0, atol=1e-12)
    assert rec.saturated.max() > 0 and rec.factor.max() > 0
    assert torch.all(rec.factor[:, 1:, 2] == 0)  # padded steps of the length-1 sequence


def test_activation_gamma_and_singular_value():
    from pyrnn import gradflow as gf
    assert gf.activation_gamma(pyrnn.RNN(2, 3)) == 1.0
    assert gf.activation_gamma(torch.nn.RNN(2, 3, nonlinearity="relu")) == 1.0
    assert gf.activation_gamma(pyrnn.LSTM(2, 3)) is None
    w = torch.diag(torch.tensor([3.0, -5.0, 1.0]))
    assert gf.largest_singular_value(w) == pytest.approx(5.0, abs=1e-12)
    # two blocks: the larger one counts
    assert gf.largest_singular_value(torch.cat([w, 2 * w]), gates=2) == pytest.approx(10.0)


def test_sweep_vanishes_below_the_bound_and_explodes_far_above(capsys):
    from pyrnn.__main__ import main
    # orthogonal W_hh scaled to rho has sigma_max = rho: below 1/gamma = 1 the tanh RNN's
    # gradient must shrink at least by rho per step (Pascanu et al. 2013)
    assert main(["gradflow", "--cells", "rnn_tanh", "--T", "30", "--batch", "4",
                 "--hidden", "16", "--input-size", "3", "--init", "orthogonal",
                 "--sweep", "0.5,4"]) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines() if l.startswith("rnn_tanh")]
    assert len(rows) == 2
    (_, _, s0, bound, d0, *_), (_, _, s1, _, d1, *_) = rows
    assert float(s0) == pytest.approx(0.5, abs=1e-3) and bound == "1"
    assert float(d0) <= 0.5 + 1e-3 and rows[0][-1] == "vanishing"
    assert float(d1) > 1.0 and rows[1][-1] == "exploding"


def test_lstm_vs_rnn_runs_and_matches_torch(capsys):
    from pyrnn.__main__ import main
    assert main(["gradflow", "--lstm-vs-rnn"]) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines()
            if l.split() and l.split()[0] == "0"]
    assert [int(r[1]) for r in rows] == [10, 50, 100, 200]
    for r in rows:
        assert float(r[4]) == pytest.approx(float(r[3]) / float(r[2]), rel=1e-3)
        assert float(r[-1]) < 1e-5  # torch.nn's gradient norm on the same weights
