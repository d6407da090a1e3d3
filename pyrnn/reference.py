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


def _clip_hook(c):
    return lambda g: g.clamp(-c, c)


def _pre(a, clip, handles=None):
    if clip and a.requires_grad:
        handle = a.register_hook(_clip_hook(clip))
        if handles is not None:
            handles.append(handle)
    return a


def _run(mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse,
         bptt_clip, steps, weight_hr=None, handles=None):
    """``handles``, if a list, receives the clipping hooks' handles (see layer_grads)."""
    T, B = input.shape[0], input.shape[1]
    h, c = hx, cx
    outputs = [None] * T
    # The input projection does not depend on the state: one product for all T * B rows.
    xg_all = torch.matmul(input, weight_ih.t())  # [T, B, G*H]
    if bias_ih is not None:
        xg_all = xg_all + bias_ih
    masks = None  # [T, B, 1]: step t runs for sequence b while t < lengths[b]
    if lengths is not None:
        masks = (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).to(input.device)
        masks = masks.unsqueeze(2)
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        xg = xg_all[t]
        hg = h @ weight_hh.t() if bias_hh is None else torch.addmm(bias_hh, h, weight_hh.t())
        c_new = gate = None
        if mode in ("rnn_tanh", "rnn_relu"):
            a = _pre(xg + hg, bptt_clip, handles)
            h_new = torch.tanh(a) if mode == "rnn_tanh" else torch.relu(a)
        elif mode == "lstm":
            ai, af, ag, ao = (_pre(x, bptt_clip, handles) for x in (xg + hg).chunk(4, 1))
            i, f, g, o = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)
            c_new = f * c + i * g
            gate = f
            h_new = o * torch.tanh(c_new)
            if weight_hr is not None:
                h_new = h_new @ weight_hr.t()
        elif mode == "gru":
            xr, xz, xn = xg.chunk(3, 1)
            hr, hz, hn = hg.chunk(3, 1)
            r = torch.sigmoid(_pre(xr + hr, bptt_clip, handles))
            z = torch.sigmoid(_pre(xz + hz, bptt_clip, handles))
            n = torch.tanh(_pre(xn + r * hn, bptt_clip, handles))
            h_new = (1 - z) * n + z * h
            gate = z
        else:
            raise ValueError(f"mode: expected 'rnn_tanh', 'rnn_relu', 'lstm' or 'gru', got {mode!r}")
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


def lstm(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
         reverse=False, bptt_clip=0.0, steps=None, weight_hr=None):
    return _run("lstm", input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                reverse, bptt_clip, steps, weight_hr)


def gru(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
        reverse=False, bptt_clip=0.0, steps=None):
    out, h, _ = _run("gru", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                     reverse, bptt_clip, steps)
    return out, h


def vanishing_penalty(mode, steps, weight_hh, bptt_clip=0.0):
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
    for prev, cur in zip(steps[:-1], steps[1:]):
        h = cur["h"].detach()
        v = cur["h"].grad if cur["h"].grad is not None else torch.zeros_like(h)
        d = 1 - h * h if mode == "rnn_tanh" else (h > 0).to(h.dtype)
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
                record=False):
    """Differentiable gradients of one layer.

    inputs: (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), None where
            absent; they keep their autograd history, which the returned gradients join.
    grads:  (grad_output [T, B, P], grad_h_n [B, P], grad_c_n [B, H]), None where zero.
    needs:  eight flags, which of ``inputs`` to differentiate (default: those present).
    record: also return the per-step norms [2, T, B] of dLoss/dh_t (row 0) and, for the
            LSTM, dLoss/dc_t (row 1), as the backward kernel records them (detached).
    Returns (eight gradients, None where not needed or absent; norms or None). The
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
        x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr = alias
        steps = [] if record else None
        handles = []
        outs = _run(mode, x, hx, cx if mode == "lstm" else None, w_ih, w_hh, b_ih, b_hh,
                    lengths, reverse, bptt_clip, steps, w_hr, handles)
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
        wrt = [alias[k] for k in range(8) if needs[k] and alias[k] is not None]
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
    result = [next(it) if (needs[k] and alias[k] is not None) else None for k in range(8)]
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
