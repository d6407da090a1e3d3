"""pyrnn's ops and modules on a device, against the float64 CPU reference: written once
per device, run for "cpu" always and for "cuda" where a GPU and a CUDA build of pyrnn are
present (skipped, with the reason shown, elsewhere). The kernels themselves are also
executed without a GPU, under the emulator of tests/cuda_emu (tests/test_cuda_emu.py).

Tolerances: normwise errors (max |error| / max |reference|) against float64 on the same
values, at most 64 u for float32 and 8 u for the 16-bit types (u the unit roundoff), as
in test_cuda_emu.py.
"""
import pytest
import torch

import pyrnn

HAS_CUDA = torch.cuda.is_available() and "cuda" in pyrnn.backends()
CUDA_SKIP = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a GPU and pyrnn built with CUDA "
    f"(GPU visible: {torch.cuda.is_available()}, backends: {pyrnn.backends()})")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TOL_FACTOR = {torch.float32: 64, torch.float16: 8, torch.bfloat16: 8}
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def dtypes_for(device):
    if device == "cpu":
        return [torch.float32]
    return [torch.float32, torch.float16, torch.bfloat16]


def normwise(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def args(mode, T, B, I, H, P, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]
    k = H**-0.5

    def u(*s, scale=k):
        return ((torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype)

    Pw = P or H
    a = dict(input=u(T, B, I, scale=1.0), hx=u(B, Pw, scale=0.5),
             cx=u(B, H, scale=0.5) if mode == "lstm" else None,
             weight_ih=u(G * H, I), weight_hh=u(G * H, Pw), bias_ih=u(G * H), bias_hh=u(G * H))
    if P:
        a["weight_hr"] = u(P, H)
    return {n: (v.to(device).requires_grad_() if v is not None else None) for n, v in a.items()}


def run_op(mode, a, **kw):
    fn = getattr(pyrnn.ops, mode)
    names = ["input", "hx"] + (["cx"] if mode == "lstm" else []) + [
        "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    extra = {"weight_hr": a["weight_hr"]} if "weight_hr" in a else {}
    out = fn(*[a[n] for n in names], **extra, **kw)
    return out[0]


def _check_op(device, mode, dtype, P=0):
    T, B, I, H = 7, 5, 6, 33
    lengths = torch.tensor([7, 0, 3, 7, 5])
    a = args(mode, T, B, I, H, P, dtype, device)
    a64 = {n: (v.detach().cpu().double().requires_grad_() if v is not None else None)
           for n, v in a.items()}
    dy = torch.randn(T, B, P or H, dtype=torch.float64)
    out = run_op(mode, a, lengths=lengths, reverse=True)
    ref = run_op(mode, a64, lengths=lengths, reverse=True)
    (out * dy.to(device, dtype)).sum().backward()
    (ref * dy).sum().backward()
    tol = TOL_FACTOR[dtype] * UNIT_ROUNDOFF[dtype]
    # 16-bit: the forward is compared alone; its gradients follow another path when a
    # rounding moves a pre-activation, so the gradient check there is looser (see
    # test_cuda_emu.py for the exact comparison of the kernels).
    assert normwise(out.detach().cpu(), ref.detach()) <= tol
    gtol = tol if dtype == torch.float32 else 64 * UNIT_ROUNDOFF[dtype]
    if mode == "rnn_relu" and dtype != torch.float32:
        return  # a flipped ReLU unit changes the gradient by O(1), not by a rounding
    for n, v in a.items():
        if v is not None:
            assert normwise(v.grad.cpu(), a64[n].grad) <= gtol, n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_op_against_float64(device, mode):
    for dtype in dtypes_for(device):
        _check_op(device, mode, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_projection_against_float64(device):
    for dtype in dtypes_for(device):
        _check_op(device, "lstm", dtype, P=9)


@pytest.mark.parametrize("device", DEVICES)
def test_modules_match_torch_nn(device):
    """pyrnn.LSTM / GRU against torch.nn (cuDNN on a GPU) in float32, packed input."""
    torch.manual_seed(0)
    for cls, ref_cls, kw in [(pyrnn.LSTM, torch.nn.LSTM, dict(proj_size=5)),
                             (pyrnn.GRU, torch.nn.GRU, {})]:
        ref = ref_cls(6, 12, num_layers=2, bidirectional=True, **kw).to(device)
        mod = cls(6, 12, num_layers=2, bidirectional=True, **kw).to(device)
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(9, 4, 6, device=device)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([9, 2, 5, 7]),
                                                         enforce_sorted=False)
        out, _ = mod(packed)
        out_ref, _ = ref(packed)
        a, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
        b, _ = torch.nn.utils.rnn.pad_packed_sequence(out_ref)
        a.sum().backward()
        b.sum().backward()
        assert normwise(a.detach(), b.detach()) <= 1e-5
        for (n, p), (_, q) in zip(mod.named_parameters(), ref.named_parameters()):
            assert normwise(p.grad, q.grad) <= 1e-4, n


@pytest.mark.parametrize("device", DEVICES)
def test_gate_stats_finite_on_padded_steps(device):
    """The workspace rows of padded steps are zero, so the gate statistics there are finite
    (on CUDA they used to read unwritten memory)."""
    m = pyrnn.LSTM(3, 8, record_gate_stats=True).to(device)
    x = torch.randn(6, 3, 3, device=device)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([6, 1, 4]),
                                                     enforce_sorted=False)
    m(packed)
    stats = m.gate_stats
    assert torch.isfinite(stats.factor).all() and torch.isfinite(stats.saturated).all()
