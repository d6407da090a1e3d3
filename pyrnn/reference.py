"""Reference implementations in plain PyTorch: readable per-step loops with autograd.

They take the same arguments as the ops in pyrnn.ops and return the same values, and
they are the oracle the tests hold the compiled kernels to. They are slow by design.

``bptt_clip`` is applied with tensor hooks on the gate pre-activations, as in
Graves (2013): the hook clamps dLoss/da to [-c, c] before autograd carries it further.
``steps``, if a list, receives one dict per step that ran ({"t", "h", "c", "gate",
"mask"}), holding the step's h_t and c_t with retain_grad() set, so that a test can read
dLoss/dh_t, and the forget gate f_t (LSTM) or update gate z_t (GRU; None otherwise).

``layer_grads`` is the differentiable backward of one layer: the gradients of the loop
above, taken by autograd with the graph kept, so that they can be differentiated again.
pyrnn.ops calls it for double backward (create_graph=True), where the fused BPTT kernel,
whose backward is not differentiable, cannot serve.
"""
import torch

from . import _C


def _clip_hook(c):
    return lambda g: g.clamp(-c, c)


def _pre(a, clip, handles=None):
    if clip and a.requires_grad:
        handle = a.register_hook(_clip_hook(clip))
        if handles is not None:
            handles.append(handle)
    return a


# ---- The cells: one step function each, and the factor its gradient crosses ----
# step(xg, hg, h, c, k, pre) -> (h_t, c_t or None, gate or None): xg = W_ih x_t + b_ih and
# hg = W_hh h_{t-1} + b_hh ([B, G*H]), h and c the state of the step before, k the cell's
# constants (the registry's order), pre(a) marks a pre-activation (the BPTT clip's hook).

def _elman(act):
    def step(xg, hg, h, c, k, pre):
        return act(pre(xg + hg), k), None, None
    return step


def _lstm_step(xg, hg, h, c, k, pre):
    ai, af, ag, ao = (pre(x) for x in (xg + hg).chunk(4, 1))
    i, f, g, o = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new, f


def _ln_lstm_step(xg, hg, h, c, k, pre, w):
    # xg and hg arrive layer-normalised (see _run); w = [gamma_ih | gamma_hh | gamma_c |
    # beta_c], of which the step uses the cell state's gain and bias
    H = c.shape[1]
    ai, af, ag, ao = (pre(x) for x in (xg + hg).chunk(4, 1))
    i, f, g, o = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)
    c_new = f * c + i * g
    c_norm = torch.nn.functional.layer_norm(c_new, (H,), w[8 * H:9 * H], w[9 * H:], k[0])
    return o * torch.tanh(c_norm), c_new, f


def _gru_step(xg, hg, h, c, k, pre):
    xr, xz, xn = xg.chunk(3, 1)
    hr, hz, hn = hg.chunk(3, 1)
    r = torch.sigmoid(pre(xr + hr))
    z = torch.sigmoid(pre(xz + hz))
    n = torch.tanh(pre(xn + r * hn))
    return (1 - z) * n + z * h, None, z


STEPS = {
    "rnn_tanh": _elman(lambda a, k: torch.tanh(a)),
    "rnn_relu": _elman(lambda a, k: torch.relu(a)),
    "rnn_leaky_relu": _elman(lambda a, k: torch.nn.functional.leaky_relu(a, k[0])),
    "lstm": _lstm_step,
    "gru": _gru_step,
    "ln_lstm": _ln_lstm_step,
}

# The layer-normalised cells, whose step takes their own weights (cell_weight) and whose
# pre-activations _run normalises: xg = LN(W_ih x) gamma_ih + b_ih, hg = LN(W_hh h) gamma_hh
# + b_hh (see csrc/cells/ln_lstm.h).
LAYER_NORM = {c["name"] for c in _C.cells() if c["layer_norm"]}

# A unit counts as saturated when its activation is within SATURATION of a bound, where
# its derivative is small: a sigmoid gate outside [0.05, 0.95] (g (1 - g) < 0.0475, under
# a fifth of its peak 0.25), a tanh unit with |h| > 0.95 (1 - h^2 < 0.0975, under a
# tenth of its peak 1), a ReLU or leaky ReLU unit at or below zero (derivative 0, or the
# negative slope).
SATURATION = 0.05


def _sigmoid_gate(block, complement):
    def stats(out, ws, H, k):
        gate = ws[..., block * H:(block + 1) * H]
        saturated = (gate < SATURATION) | (gate > 1 - SATURATION)
        return (1 - gate if complement else gate), saturated
    return stats


# gate_factor: (out [T, B, H], the forward's workspace, H, constants) -> (factor,
# saturated) [T, B, H]: the multiplicative factor on the gradient's path from h_t (c_t)
# back to step t-1, and whether the unit is saturated (see SATURATION). The forget gate f_t
# (LSTM: workspace rows i, f, g, o, c), 1 - z_t (GRU: rows r, z, n, W_hn h + b_hn), the
# activation's derivative (Elman).
GATE_FACTORS = {
    "rnn_tanh": lambda out, ws, H, k: (1 - out * out, out.abs() > 1 - SATURATION),
    "rnn_relu": lambda out, ws, H, k: ((out > 0).to(out.dtype), out <= 0),
    "rnn_leaky_relu": lambda out, ws, H, k: (
        torch.where(out > 0, torch.ones_like(out), torch.full_like(out, k[0])), out <= 0),
    "lstm": _sigmoid_gate(1, False),
    "gru": _sigmoid_gate(1, True),
    "ln_lstm": _sigmoid_gate(1, False),
}


def gate_factor(mode, out, workspace, H, params=()):
    """(factor, saturated), each [T, B, H]: see GATE_FACTORS."""
    return GATE_FACTORS[mode](out, workspace, H, list(params))


# The defaults of every cell's constants, in the registry's order.
_DEFAULTS = {c["name"]: list(c["params"].values()) for c in _C.cells()}


def _constants(mode, params):
    """The cell's constants: ``params``, or its defaults when None or empty."""
    return _DEFAULTS[mode] if params is None or len(params) == 0 else list(params)


def _run(mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse,
         bptt_clip, steps, weight_hr=None, handles=None, params=None, cell_weight=None):
    """``handles``, if a list, receives the clipping hooks' handles (see layer_grads).
    ``params``: the cell's constants (None: its defaults). ``cell_weight``: the own
    weights of a layer-normalised cell (LAYER_NORM)."""
    if mode not in STEPS:
        raise ValueError(f"mode: expected one of {', '.join(repr(m) for m in STEPS)}, "
                         f"got {mode!r}")
    step = STEPS[mode]
    k = _constants(mode, params)
    # bfloat16 weights with a float32 input (the ops' bfloat16 products): here the same
    # weights, multiplied in the input's dtype
    weight_ih, weight_hh = weight_ih.to(input.dtype), weight_hh.to(input.dtype)
    weight_hr = None if weight_hr is None else weight_hr.to(input.dtype)
    T, B = input.shape[0], input.shape[1]
    h, c = hx, cx
    outputs = [None] * T
    # The input projection does not depend on the state: one product for all T * B rows.
    xg_all = torch.matmul(input, weight_ih.t())  # [T, B, G*H]
    norm = mode in LAYER_NORM
    if norm:
        GH = weight_hh.shape[0]
        if cell_weight is None:
            cell_weight = initial_cell_weight(mode, GH // 4, input)
        xg_all = torch.nn.functional.layer_norm(xg_all, (GH,), cell_weight[:GH], bias_ih, k[0])
        step = (lambda f: lambda *a: f(*a, cell_weight))(step)
    elif bias_ih is not None:
        xg_all = xg_all + bias_ih
    masks = None  # [T, B, 1]: step t runs for sequence b while t < lengths[b]
    if lengths is not None:
        masks = (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).to(input.device)
        masks = masks.unsqueeze(2)

    def pre(a):
        return _pre(a, bptt_clip, handles)

    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        if norm:
            hg = torch.nn.functional.layer_norm(h @ weight_hh.t(), (GH,),
                                                cell_weight[GH:2 * GH], bias_hh, k[0])
        else:
            hg = h @ weight_hh.t() if bias_hh is None else torch.addmm(bias_hh, h,
                                                                       weight_hh.t())
        h_new, c_new, gate = step(xg_all[t], hg, h, c, k, pre)
        if weight_hr is not None:
            h_new = h_new @ weight_hr.t()
        if steps is not None:
            if h_new.requires_grad:
                h_new.retain_grad()
            if c_new is not None and c_new.requires_grad:
                c_new.retain_grad()
            mask = (masks[t, :, 0] if masks is not None
                    else torch.ones(B, dtype=torch.bool, device=input.device))
            steps.append({"t": t, "h": h_new, "c": c_new, "gate": gate, "mask": mask})
        if masks is None:
            h, c, outputs[t] = h_new, (c if c_new is None else c_new), h_new
        else:
            h = torch.where(masks[t], h_new, h)
            if c_new is not None:
                c = torch.where(masks[t], c_new, c)
            outputs[t] = torch.where(masks[t], h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, c


def rnn_tanh(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
             reverse=False, bptt_clip=0.0, steps=None):
    out, h, _ = _run("rnn_tanh", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh,
                     lengths, reverse, bptt_clip, steps)
    return out, h


def rnn_relu(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
             reverse=False, bptt_clip=0.0, steps=None):
    out, h, _ = _run("rnn_relu", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh,
                     lengths, reverse, bptt_clip, steps)
    return out, h


def rnn_leaky_relu(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
                   reverse=False, bptt_clip=0.0, steps=None, negative_slope=0.01):
    out, h, _ = _run("rnn_leaky_relu", input, hx, None, weight_ih, weight_hh, bias_ih,
                     bias_hh, lengths, reverse, bptt_clip, steps, params=[negative_slope])
    return out, h


def lstm(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
         reverse=False, bptt_clip=0.0, steps=None, weight_hr=None):
    return _run("lstm", input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                reverse, bptt_clip, steps, weight_hr)


def gru(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
        reverse=False, bptt_clip=0.0, steps=None):
    out, h, _ = _run("gru", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                     reverse, bptt_clip, steps)
    return out, h


def ln_lstm(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
            reverse=False, bptt_clip=0.0, steps=None, cell_weight=None, eps=1e-5):
    """The LayerNorm-LSTM (csrc/cells/ln_lstm.h, pyrnn.ops.ln_lstm); cell_weight [10 H] =
    [gamma_ih 4H | gamma_hh 4H | gamma_c H | beta_c H], None for the initial one (gains 1,
    beta_c 0)."""
    return _run("ln_lstm", input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                reverse, bptt_clip, steps, params=[eps], cell_weight=cell_weight)


def initial_cell_weight(mode, H, like):
    """The own weights of a layer-normalised cell as pyrnn.LayerNormLSTM initialises them
    (gains 1, the cell state's bias 0), with like's dtype and device; None for the other
    cells."""
    if mode not in LAYER_NORM:
        return None
    return torch.cat([torch.ones(9 * H, dtype=like.dtype, device=like.device),
                      torch.zeros(H, dtype=like.dtype, device=like.device)])


def vanishing_penalty(mode, steps, weight_hh, bptt_clip=0.0, params=None):
    """The regulariser of Pascanu, Mikolov and Bengio (2013) for one Elman layer and
    direction, by autograd, from the ``steps`` record of a run whose loss has been
    back-propagated (so that each step's h holds v = dLoss/dh_t in .grad).

    For each step k whose successor s (the next step that ran) lies within the sequence:
    g = v_s * phi'(a_s) (clamped to [-bptt_clip, bptt_clip] when on), u = g @ W_hh,
    ratio = |u| / |v_s| (0 where |v_s| = 0). Returns (omega, ratio): omega =
    (1/B) sum (ratio - 1)^2, differentiable in ``weight_hh`` with v and phi' constant, and
    ratio [T, B] indexed by k (zero where k has no successor)."""
    T = len(steps) and max(s["t"] for s in steps) + 1
    B = steps[0]["h"].shape[0]
    ratio = weight_hh.new_zeros(T, B)
    omega = weight_hh.new_zeros(())
    k = _constants(mode, params)
    for prev, cur in zip(steps[:-1], steps[1:]):
        h = cur["h"].detach()
        v = cur["h"].grad if cur["h"].grad is not None else torch.zeros_like(h)
        d = GATE_FACTORS[mode](h, None, h.shape[1], k)[0]  # the activation's derivative
        g = v * d
        if bptt_clip:
            g = g.clamp(-bptt_clip, bptt_clip)
        u = g @ weight_hh
        nu, nv = u.norm(dim=1), v.norm(dim=1)
        pair = (cur["mask"] & prev["mask"]).to(h.dtype)
        r = torch.where(nv > 0, nu / torch.where(nv > 0, nv, torch.ones_like(nv)),
                        torch.zeros_like(nu)) * pair
        omega = omega + ((r - 1) ** 2 * pair).sum() / B
        ratio[prev["t"]] = r.detach()
    return omega, ratio


def layer_grads(mode, inputs, grads, lengths=None, reverse=False, bptt_clip=0.0, needs=None,
                record=False, params=None):
    """Differentiable gradients of one layer.

    inputs: (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr[,
            cell_weight]), None where absent; they keep their autograd history, which the
            returned gradients join.
    grads:  (grad_output [T, B, P], grad_h_n [B, P], grad_c_n [B, H]), None where zero.
    needs:  one flag per input, which of ``inputs`` to differentiate (default: those
            present).
    record: also return the per-step norms [2, T, B] of dLoss/dh_t (row 0) and, for the
            LSTM, dLoss/dc_t (row 1), as the backward kernel records them (detached).
    params: the cell's constants (None or empty: its defaults).
    Returns (one gradient per input, None where not needed or absent; norms or None). The
    gradients are computed with create_graph=True, so they are differentiable in the
    inputs and in ``grads``. bptt_clip clamps the gate gradients of this (first-order)
    backward as the forward's hooks do; a clamp is differentiable (slope 1 inside, 0 where
    it clips), and gradients of the returned gradients are not clamped.
    """
    if needs is None:
        needs = [t is not None for t in inputs]
    with torch.enable_grad():
        # One alias per argument, so that a tensor passed twice (tied weights) gets each
        # argument's own share of the gradient, as the fused backward returns it.
        alias = [None if t is None else t.view_as(t) for t in inputs]
        x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr = alias[:8]
        cw = alias[8] if len(alias) > 8 else None
        steps = [] if record else None
        handles = []
        outs = _run(mode, x, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths, reverse, bptt_clip,
                    steps, w_hr, handles, params, cw)
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
        n = len(alias)
        wrt = [alias[k] for k in range(n) if needs[k] and alias[k] is not None]
        tracked = []
        if record:
            tracked = [s["h"] for s in steps] + [s["c"] for s in steps if s["c"] is not None]
        if pairs:
            got = torch.autograd.grad([o for o, _ in pairs], wrt + tracked,
                                      [g for _, g in pairs], create_graph=True,
                                      allow_unused=True, materialize_grads=True)
        else:
            got = [torch.zeros_like(t) for t in wrt + tracked]
        # The clamps are now part of the gradients' graph. A hook stays on its tensor and
        # would clamp every later gradient through it too, the second-order ones included,
        # where the fused kernel's clip does not reach: remove them.
        for handle in handles:
            handle.remove()
    it = iter(got[:len(wrt)])
    result = [next(it) if (needs[k] and alias[k] is not None) else None for k in range(n)]
    norms = None
    if record:
        T, B = x.shape[0], x.shape[1]
        norms = x.new_zeros(2, T, B)
        dh = got[len(wrt):len(wrt) + len(steps)]
        dc = got[len(wrt) + len(steps):]
        with torch.no_grad():
            for k, s in enumerate(steps):
                m = s["mask"].to(x.dtype)
                norms[0, s["t"]] = torch.linalg.vector_norm(dh[k], dim=1) * m
                if dc:
                    norms[1, s["t"]] = torch.linalg.vector_norm(dc[k], dim=1) * m
    return result, norms


def stack(mode, input, h0, c0, weights, lengths=None, bidirectional=False, bptt_clip=0.0,
          params=None, steps=None):
    """A stack of layers, as torch.nn's multi-layer (and bidirectional) modules run them.

    input [T, B, I]; h0 [L*D, B, P] and c0 [L*D, B, H] (c0 None unless the cell has a cell
    state); weights: one (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr[, cell_weight])
    per layer and direction, in torch.nn's order (layer by layer, forward before reverse),
    None where absent. steps, if a list, receives one list of step records per layer and direction
    (see _run). No dropout. Returns (output [T, B, D*P], h_n [L*D, B, P], c_n or None)."""
    D = 2 if bidirectional else 1
    L = len(weights) // D
    layer_input, h_n, c_n = input, [], []
    for layer in range(L):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k][:5]
            cw = weights[k][5] if len(weights[k]) > 5 else None
            record = [] if steps is not None else None
            out, h, c = _run(mode, layer_input, h0[k], None if c0 is None else c0[k], w_ih,
                             w_hh, b_ih, b_hh, lengths, d == 1, bptt_clip, record, w_hr,
                             params=params, cell_weight=cw)
            if steps is not None:
                steps.append(record)
            outs.append(out)
            h_n.append(h)
            if c0 is not None:
                c_n.append(c)
        layer_input = outs[0] if D == 1 else torch.cat(outs, 2)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)
