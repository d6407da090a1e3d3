"""pyrnn.init: what each scheme sets, on pyrnn and torch.nn modules and cells alike."""
import math

import pytest
import torch
from torch import nn

import pyrnn
from pyrnn import init

H = 6


def _modules(kind):
    """Pairs of (name, module) of one kind, pyrnn and torch.nn, layered, bidirectional
    and cells, in float64."""
    kw = dict(dtype=torch.float64)
    out = []
    for lib in (pyrnn, nn):
        if kind == "rnn":
            out += [(f"{lib.__name__}.RNN", getattr(lib, "RNN")(3, H, num_layers=2,
                                                                bidirectional=True, **kw)),
                    (f"{lib.__name__}.RNNCell", getattr(lib, "RNNCell")(3, H, **kw))]
        elif kind == "lstm":
            out += [(f"{lib.__name__}.LSTM", getattr(lib, "LSTM")(3, H, num_layers=2,
                                                                  bidirectional=True, **kw)),
                    (f"{lib.__name__}.LSTMCell", getattr(lib, "LSTMCell")(3, H, **kw))]
        else:
            out += [(f"{lib.__name__}.GRU", getattr(lib, "GRU")(3, H, num_layers=2,
                                                                bidirectional=True, **kw)),
                    (f"{lib.__name__}.GRUCell", getattr(lib, "GRUCell")(3, H, **kw))]
    return out


ALL = _modules("rnn") + _modules("lstm") + _modules("gru")
LSTMS = _modules("lstm")


def _hh(m):
    return [p for n, p in m.named_parameters() if n.startswith("weight_hh")]


def _biases(m):
    """[(bias_ih, bias_hh)] per layer and direction."""
    names = [n for n, _ in m.named_parameters() if n.startswith("bias_ih")]
    return [(getattr(m, n), getattr(m, n.replace("bias_ih", "bias_hh"))) for n in names]


def _blocks(m, w):
    G = init.gates_of(m)
    return w.detach().view(G, w.shape[0] // G, w.shape[1]).unbind(0)


def test_gates_of():
    for name, m in ALL:
        G = 4 if "LSTM" in name else 3 if "GRU" in name else 1
        assert init.gates_of(m) == G, name


@pytest.mark.parametrize("name,m", ALL, ids=[n for n, _ in ALL])
def test_identity(name, m):
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert init.identity_(m, gain=0.5) is m
    for w in _hh(m):
        for blk in _blocks(m, w):
            assert torch.equal(blk, 0.5 * torch.eye(H, dtype=torch.float64))
    for b_ih, b_hh in _biases(m):
        assert not b_ih.any() and not b_hh.any()
    for n, p in m.named_parameters():  # input weights untouched
        if n.startswith("weight_ih"):
            assert torch.equal(p, before[n])


def test_identity_relu_rnn_carries_its_state():
    # The point of the IRNN: with no input, h_t = relu(I h_{t-1}) = h_0 for h_0 >= 0.
    m = init.identity_(pyrnn.RNN(2, H, nonlinearity="relu", dtype=torch.float64))
    h0 = torch.rand(1, 3, H, dtype=torch.float64)
    out, h = m(torch.zeros(50, 3, 2, dtype=torch.float64), h0)
    assert torch.equal(h, h0) and torch.equal(out[0], h0[0])


@pytest.mark.parametrize("name,m", ALL, ids=[n for n, _ in ALL])
def test_orthogonal(name, m):
    init.orthogonal_(m, gain=2.0, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(H, dtype=torch.float64)
    for w in _hh(m):
        for blk in _blocks(m, w):
            # float64 QR: the Gram matrix is exact to a few ulp of 4
            torch.testing.assert_close(blk.T @ blk, 4.0 * eye, atol=1e-12, rtol=0)
    # the blocks differ from one another (drawn independently)
    blks = _blocks(m, _hh(m)[0])
    if len(blks) > 1:
        assert not torch.equal(blks[0], blks[1])


def test_orthogonal_same_on_pyrnn_and_torch():
    a, b = pyrnn.LSTM(3, H, num_layers=2), nn.LSTM(3, H, num_layers=2)
    init.orthogonal_(a, generator=torch.Generator().manual_seed(5))
    init.orthogonal_(b, generator=torch.Generator().manual_seed(5))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if n.startswith("weight_hh"):
            assert torch.equal(p, q)


def test_orthogonal_projected_lstm_is_semi_orthogonal():
    m = nn.LSTM(3, 8, proj_size=3, dtype=torch.float64)
    init.orthogonal_(m)
    for blk in _blocks(m, m.weight_hh_l0):  # [8, 3] blocks: orthonormal columns
        torch.testing.assert_close(blk.T @ blk, torch.eye(3, dtype=torch.float64),
                                   atol=1e-12, rtol=0)


@pytest.mark.parametrize("rho", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("name,m", ALL, ids=[n for n, _ in ALL])
def test_spectral_radius(name, m, rho):
    before = [w.detach().clone() for w in _hh(m)]
    init.spectral_radius_(m, rho)
    for w, w0 in zip(_hh(m), before):
        for blk, blk0 in zip(_blocks(m, w), _blocks(m, w0)):
            r = torch.linalg.eigvals(blk).abs().max().item()
            # float64 eigenvalues of a 6x6 matrix: a few ulp times the condition
            assert abs(r - rho) < 1e-10, (name, r, rho)
            # the same direction: blk is a positive multiple of blk0
            c = (blk * blk0).sum() / (blk0 * blk0).sum()
            assert c > 0
            torch.testing.assert_close(blk, c * blk0, atol=1e-12, rtol=0)


def test_spectral_radius_bad_input():
    with pytest.raises(ValueError, match="rho"):
        init.spectral_radius_(nn.RNN(2, 3), -1.0)
    with pytest.raises(ValueError, match="square"):
        init.spectral_radius_(nn.LSTM(2, 8, proj_size=3), 1.0)
    m = nn.RNN(2, 3)
    with torch.no_grad():
        m.weight_hh_l0.zero_()
    with pytest.raises(ValueError, match="spectral radius 0"):
        init.spectral_radius_(m, 1.0)


@pytest.mark.parametrize("name,m", LSTMS, ids=[n for n, _ in LSTMS])
def test_forget_bias(name, m):
    before = [(a.detach().clone(), b.detach().clone()) for a, b in _biases(m)]
    init.forget_bias_(m, 1.5)
    for (b_ih, b_hh), (a0, b0) in zip(_biases(m), before):
        s = (b_ih + b_hh).detach()
        assert torch.equal(s[H:2 * H], torch.full((H,), 1.5, dtype=torch.float64))
        for g in (0, 2, 3):  # other gates unchanged
            sl = slice(g * H, (g + 1) * H)
            assert torch.equal(b_ih[sl], a0[sl]) and torch.equal(b_hh[sl], b0[sl])


def test_forget_bias_opens_the_forget_gate():
    # Zero input and state: f = sigmoid(b_f), so c_1 = f c_0 exactly where i g = 0.
    m = pyrnn.LSTM(2, H, dtype=torch.float64)
    init.forget_bias_(m, 2.0)
    with torch.no_grad():
        m.bias_ih_l0[2 * H:3 * H] = 0.0  # g = tanh(0) = 0
        m.bias_hh_l0[2 * H:3 * H] = 0.0
    c0 = torch.ones(1, 1, H, dtype=torch.float64)
    _, (_, c1) = m(torch.zeros(1, 1, 2, dtype=torch.float64),
                   (torch.zeros(1, 1, H, dtype=torch.float64), c0))
    torch.testing.assert_close(c1, torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
                               * c0, atol=1e-15, rtol=0)


@pytest.mark.parametrize("name,m", LSTMS, ids=[n for n, _ in LSTMS])
def test_chrono(name, m):
    t_max = 40.0
    init.chrono_(m, t_max, generator=torch.Generator().manual_seed(0))
    for b_ih, b_hh in _biases(m):
        s = (b_ih + b_hh).detach()
        b_i, b_f = s[:H], s[H:2 * H]
        assert torch.equal(b_i, -b_f)
        assert (b_f >= 0).all() and (b_f <= math.log(t_max - 1)).all()
        assert not b_hh[:2 * H].any()


def test_chrono_distribution():
    # exp(b_f) is U(1, t_max - 1): its mean within 6 standard errors of t_max / 2.
    t_max, n = 100.0, 20000
    # proj_size=1 keeps weight_hh at 4n x 1 (without it, 4n x n: 6.4 GB to initialise)
    m = init.chrono_(nn.LSTM(1, n, proj_size=1), t_max,
                     generator=torch.Generator().manual_seed(1))
    u = m.bias_ih_l0[n:2 * n].detach().double().exp()
    se = (t_max - 2) / math.sqrt(12 * n)
    assert abs(u.mean().item() - t_max / 2) < 6 * se
    assert u.min() >= 1 - 1e-5 and u.max() <= t_max - 1 + 1e-3


def test_containers_and_errors():
    seq = nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, H), pyrnn.GRU(2, H))
    init.identity_(seq)
    assert torch.equal(seq[1].weight_hh_l0[:H], torch.eye(H))
    assert torch.equal(seq[2].weight_hh_l0[2 * H:], torch.eye(H))
    with pytest.raises(TypeError, match="recurrent module"):
        init.orthogonal_(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="LSTM and LSTMCell only, got GRU"):
        init.forget_bias_(pyrnn.GRU(2, 3))
    with pytest.raises(ValueError, match="bias=False"):
        init.chrono_(nn.LSTM(2, 3, bias=False), 10)
    with pytest.raises(ValueError, match="t_max"):
        init.chrono_(nn.LSTM(2, 3), 2)
    with pytest.raises(TypeError, match="module"):
        init.identity_("lstm")
