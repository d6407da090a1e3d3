"""The vanishing-gradient regulariser (vanishing_penalty) against an autograd implementation of
the same definition (pyrnn.reference.vanishing_penalty), in float64."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyrnn
from pyrnn import ops, reference

from conftest import make_layer_args

DT = torch.float64
# float64 on both sides: the kernel's products and the reference's per-step loop differ by
# rounding only, a few ulp of the sums of T * B terms (measured well under 1e-12 here).
TOL = dict(atol=1e-10, rtol=1e-9)


def _op_and_reference(mode, lam, lengths, reverse, clip, T=7, B=5, I=3, H=4, seed=0):
    args = make_layer_args(mode, T, B, I, H, dtype=DT, seed=seed, scale=0.7)
    x, hx, _, w_ih, w_hh, b_ih, b_hh = args
    g = torch.Generator().manual_seed(seed + 100)
    r_out, r_h = torch.randn(T, B, H, generator=g, dtype=DT), torch.randn(B, H, generator=g,
                                                                          dtype=DT)
    leaves = [x, hx, w_ih, w_hh, b_ih, b_hh]
    # the op
    ratio, omega = torch.zeros(T, B, dtype=DT), torch.zeros(1, dtype=DT)
    out, h = getattr(ops, mode)(x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, clip,
                                vanishing_penalty=lam, ratio_out=ratio, omega_out=omega)
    got = torch.autograd.grad((out * r_out).sum() + (h * r_h).sum(), leaves)
    # the reference: the loss's gradient, then lam * dOmega/dW_hh with v held constant
    steps = []
    out, h = getattr(reference, mode)(x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, clip,
                                      steps=steps)
    loss = (out * r_out).sum() + (h * r_h).sum()
    want = list(torch.autograd.grad(loss, leaves + [s["h"] for s in steps]))
    for s, v in zip(steps, want[len(leaves):]):
        s["h"].grad = v
    want = want[:len(leaves)]
    om, rat = reference.vanishing_penalty(mode, steps, w_hh, clip)
    d_omega = torch.autograd.grad(om, w_hh)[0]
    return got, want, (ratio, omega), (rat, om.detach()), d_omega


CASES = [(None, False, 0.0), ([7, 3, 5, 1, 6], False, 0.0), ([7, 3, 5, 1, 6], True, 0.0),
         (None, True, 0.0), ([4, 7, 2, 7, 5], False, 0.05), ([4, 7, 2, 7, 5], True, 0.05)]


@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("lengths,reverse,clip", CASES)
def test_op_matches_reference(mode, lengths, reverse, clip):
    lam = 0.3
    lengths = None if lengths is None else torch.tensor(lengths)
    got, want, (ratio, omega), (rat, om), d_omega = _op_and_reference(
        mode, lam, lengths, reverse, clip)
    torch.testing.assert_close(ratio, rat, **TOL)
    torch.testing.assert_close(omega[0], om, **TOL)
    assert om > 0 and (rat > 0).any()
    want[3] = want[3] + lam * d_omega  # W_hh: the loss's gradient plus lam dOmega/dW_hh
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    if lengths is not None:  # no ratio for a step without a successor in its sequence
        for b_, n in enumerate(lengths.tolist()):
            last = 0 if reverse else n - 1
            assert ratio[last, b_] == 0 and (ratio[n:, b_] == 0).all()


def test_sign_and_scale_are_checked():
    # The penalty's share of dW_hh is lam * dOmega/dW_hh, and the comparison's tolerance is
    # far below what a flipped sign or a doubled scale would change: the test above fails
    # for either.
    lam = 0.3
    got, want, _, _, d_omega = _op_and_reference("rnn_tanh", lam, torch.tensor([7, 3, 5, 1, 6]),
                                                 False, 0.0)
    share = got[3] - want[3]
    torch.testing.assert_close(share, lam * d_omega, **TOL)
    assert (share - lam * d_omega).abs().max() < 1e-10
    assert (lam * d_omega).abs().max() > 1e-3
    for wrong in (-lam * d_omega, 2 * lam * d_omega):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(share, wrong, **TOL)


def test_zero_penalty_changes_nothing():
    got, want, (ratio, omega), _, _ = _op_and_reference("rnn_tanh", 0.0, None, False, 0.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert not ratio.any() and not omega.any()  # not computed when off


def _module_reference(m, x, lengths, r_out, r_h, lam):
    """The module's loss and penalty through reference layers: (grads by parameter name,
    omega [L * D], ratio [L * D, T, B])."""
    D = 2 if m.bidirectional else 1
    layer_in, h_n, records = x, [], []
    mode = "rnn_tanh" if m.nonlinearity == "tanh" else "rnn_relu"
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, _ = m._weights(layer, d)
            steps = []
            out, h = getattr(reference, mode)(layer_in, x.new_zeros(x.shape[1], m.hidden_size),
                                              w_ih, w_hh, b_ih, b_hh, lengths, d == 1,
                                              m.bptt_clip, steps=steps)
            outs.append(out)
            h_n.append(h)
            records.append((steps, w_hh))
        layer_in = torch.cat(outs, 2) if D == 2 else outs[0]
    loss = (layer_in * r_out).sum() + (torch.stack(h_n) * r_h).sum()
    params = dict(m.named_parameters())
    all_steps = [s for st, _ in records for s in st]
    grads = torch.autograd.grad(loss, list(params.values()) + [s["h"] for s in all_steps])
    for s, v in zip(all_steps, grads[len(params):]):
        s["h"].grad = v
    grads = dict(zip(params, grads[:len(params)]))
    omegas, ratios = [], []
    for steps, w_hh in records:
        om, rat = reference.vanishing_penalty(mode, steps, w_hh, m.bptt_clip)
        omegas.append(om.detach())
        ratios.append(rat)
        dw = torch.autograd.grad(om, w_hh)[0]
        name = [n for n, p in params.items() if p is w_hh][0]
        grads[name] = grads[name] + lam * dw
    return grads, torch.stack(omegas), torch.stack(ratios)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True])
def test_module_layers_directions_lengths(nonlinearity, packed):
    torch.manual_seed(3)
    lam, T, B, I, H = 0.2, 6, 4, 3, 5
    m = pyrnn.RNN(I, H, num_layers=2, bidirectional=True, nonlinearity=nonlinearity,
                  dtype=DT, vanishing_penalty=lam, record_grad_norms=True, bptt_clip=0.5)
    x = torch.randn(T, B, I, dtype=DT)
    lengths = torch.tensor([4, 6, 2, 5]) if packed else None
    r_out = torch.randn(T, B, 2 * H, dtype=DT)
    r_h = torch.randn(4, B, H, dtype=DT)
    if packed:
        out, h = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, h = m(x)
    params = dict(m.named_parameters())
    got = dict(zip(params, torch.autograd.grad((out * r_out).sum() + (h * r_h).sum(),
                                               list(params.values()))))
    want, omega, ratio = _module_reference(m, x, lengths, r_out, r_h, lam)
    torch.testing.assert_close(m.vanishing_omega, omega, **TOL)
    torch.testing.assert_close(m.grad_norms.ratio, ratio, **TOL)
    assert m.grad_norms.ratio.shape == m.grad_norms.hidden.shape
    for name in params:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def test_gated_cells_and_bad_values_raise():
    for cls in (pyrnn.LSTM, pyrnn.GRU):
        with pytest.raises(ValueError, match="vanishing_penalty"):
            cls(2, 3, vanishing_penalty=0.1)
        m = cls(2, 3)
        m.vanishing_penalty = 0.1
        with pytest.raises(ValueError, match="vanishing_penalty: .* Elman"):
            m(torch.randn(4, 1, 2))
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = make_layer_args("gru", 3, 2, 2, 3)
    with pytest.raises(ValueError, match="vanishing_penalty"):
        ops.layer("gru", x, hx, None, w_ih, w_hh, b_ih, b_hh, vanishing_penalty=1.0)
    x, hx, _, w_ih, w_hh, b_ih, b_hh = make_layer_args("rnn_tanh", 3, 2, 2, 3)
    with pytest.raises(ValueError, match="ratio_out"):
        ops.rnn_tanh(x, hx, w_ih, w_hh, vanishing_penalty=1.0, ratio_out=torch.zeros(2, 2,
                                                                                   dtype=DT))
    with pytest.raises(ValueError, match="vanishing_penalty: expected a finite"):
        ops.rnn_tanh(x, hx, w_ih, w_hh, vanishing_penalty=float("nan"))


def test_module_without_recording_keeps_omega_only():
    m = pyrnn.RNN(2, 4, vanishing_penalty=0.5)
    assert m.vanishing_omega is None
    out, _ = m(torch.randn(5, 3, 2))
    out[-1].sum().backward()
    assert m.vanishing_omega.shape == (1,) and m.vanishing_omega[0] > 0
    m2 = pyrnn.RNN(2, 4, record_grad_norms=True)
    m2(torch.randn(5, 3, 2))[0].sum().backward()
    assert m2.grad_norms.ratio is None and m2.vanishing_omega is None


@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_with_penalty(reverse):
    x, hx, _, w_ih, w_hh, b_ih, b_hh = make_layer_args("rnn_tanh", 4, 3, 2, 5)
    lengths = torch.tensor([4, 1, 3])
    ratio, omega = torch.zeros(4, 3, dtype=DT), torch.zeros(1, dtype=DT)
    fwd = ("rnn_tanh", x, hx, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse, True, 0.0,
           None, 0.5, ratio, omega)
    torch.library.opcheck(torch.ops.pyrnn.forward.default, fwd)
    out = torch.ops.pyrnn.forward(*fwd)
    d = [t.detach() for t in (x, hx, w_ih, w_hh)]
    res = torch.library.opcheck(
        torch.ops.pyrnn.backward.default,
        ("rnn_tanh", torch.randn_like(out[0]), None, None, d[0], d[1], None, d[2], d[3], None,
         True, True, lengths, out[0].detach(), out[3].detach(), reverse, 0.0, False, 0.5),
        test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), res


def test_penalty_with_double_backward_raises():
    m = pyrnn.RNN(3, 4, vanishing_penalty=0.1, dtype=torch.float64)
    out, _ = m(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="vanishing_penalty"):
        torch.autograd.grad(out.sum(), m.weight_hh_l0, create_graph=True)


def test_tiny_gradients_in_float32():
    # Far from the loss the gradient of a vanishing RNN is 1e-20 and less; in float32 its
    # squared norm underflows and 1 / (|u| |v|) overflows (this gave NaN at the first update
    # of a tanh RNN on temporal order at T = 100). Omega, the ratios and the penalty's
    # gradient do not depend on the scale of the loss, so a loss scaled by 1e-20 or 1e-30
    # must give what the unscaled loss gives (the loss's own part of dW_hh shrinks with the
    # scale and is left out: rtol 1e-4 is float32 rounding over a few products).
    torch.manual_seed(0)
    m = pyrnn.RNN(4, 16, vanishing_penalty=1.0, record_grad_norms=True)
    x = torch.randn(12, 3, 4)

    def run(scale, penalty):
        m.vanishing_penalty = penalty
        m.zero_grad()
        (scale * m(x)[0][-1].sum()).backward()
        if not penalty:
            return m.weight_hh_l0.grad.clone(), None, None
        return m.weight_hh_l0.grad.clone(), m.vanishing_omega.clone(), m.grad_norms.ratio.clone()

    g1, omega1, ratio1 = run(1.0, 1.0)
    pen1 = g1 - run(1.0, 0.0)[0]
    assert omega1.item() > 0.1 and pen1.abs().max() > 1e-3
    for scale in (1e-20, 1e-30):
        g, omega, ratio = run(scale, 1.0)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(omega, omega1, rtol=1e-4, atol=0)
        torch.testing.assert_close(ratio, ratio1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, pen1, rtol=1e-3, atol=1e-4 * pen1.abs().max().item())
