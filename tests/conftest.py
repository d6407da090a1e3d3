import pytest
import torch

from pyrnn import _C, ops

# Every cell of the registry (csrc/cells/registry.h), and its facts, from the library.
MODES = list(ops.CELLS)
GATES = ops.GATES
HAS_CELL = {m: c["has_cell"] for m, c in ops.CELLS.items()}
# The compiled copies of the CPU loops that this CPU runs (see the capability fixture).
SUPPORTED = _C.supported_capabilities().split(",")


def make_layer_args(mode, T, B, I, H, dtype=torch.float64, bias=True, h0=True, seed=0,
                    requires_grad=True, scale=0.5):
    """Random arguments for one layer op: (input, hx, cx, w_ih, w_hh, b_ih, b_hh)."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)

    x = rnd(T, B, I)
    hx = rnd(B, H) if h0 else torch.zeros(B, H, dtype=dtype)
    cx = (rnd(B, H) if h0 else torch.zeros(B, H, dtype=dtype)) if HAS_CELL[mode] else None
    w_ih, w_hh = rnd(G * H, I), rnd(G * H, H)
    b_ih, b_hh = (rnd(G * H), rnd(G * H)) if bias else (None, None)
    return x, hx, cx, w_ih, w_hh, b_ih, b_hh


def nudged(tensors, seed):
    """The float32 tensors moved by up to one rounding each (None stays None): a
    neighbouring problem, on which a float32 run's own rounding error can be sampled again."""
    g = torch.Generator().manual_seed(seed)
    eps = 2.0 ** -24
    return [None if t is None else
            (t.double() * (1 + eps * (2 * torch.rand(t.shape, generator=g,
                                                     dtype=torch.float64) - 1))).float()
            for t in tensors]


def call_op(impl, mode, x, hx, cx, w_ih, w_hh, b_ih, b_hh, **kw):
    """Calls pyrnn.ops.<mode> or pyrnn.reference.<mode>; returns (output, h_n, c_n or None)."""
    fn = getattr(impl, mode)
    if HAS_CELL[mode]:
        return tuple(fn(x, hx, cx, w_ih, w_hh, b_ih, b_hh, **kw))
    out, h = fn(x, hx, w_ih, w_hh, b_ih, b_hh, **kw)
    return out, h, None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def capability(request):
    """Forces the copy of the CPU loops named by the test's parameter (indirect), then
    restores the one in use."""
    before = _C.cpu_capability()
    _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability(before)
