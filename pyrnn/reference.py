"""Reference implementations in plain PyTorch: readable per-step loops with autograd.

They take the same arguments as the ops in pyrnn.ops and return the same values, and
they are the oracle the tests hold the compiled kernels to. They are slow by design.

``bptt_clip`` is applied with tensor hooks on the gate pre-activations, as in
Graves (2013): the hook clamps dLoss/da to [-c, c] before autograd carries it further.
``steps``, if a list, receives one dict per step that ran ({"t", "h", "c", "gate",
"mask"}), holding the step's h_t and c_t with retain_grad() set, so that a test can read
dLoss/dh_t, and the forget gate f_t (LSTM) or update gate z_t (GRU; None otherwise).
"""
import torch


def _clip_hook(c):
    return lambda g: g.clamp(-c, c)


def _pre(a, clip):
    if clip and a.requires_grad:
        a.register_hook(_clip_hook(clip))
    return a


def _run(mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse,
         bptt_clip, steps, weight_hr=None):
    T, B = input.shape[0], input.shape[1]
    h, c = hx, cx
    outputs = [None] * T
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        mask = (t < lengths).to(input.device).unsqueeze(1)  # [B, 1]
        xg = input[t] @ weight_ih.t()
        hg = h @ weight_hh.t()
        if bias_ih is not None:
            xg = xg + bias_ih
            hg = hg + bias_hh
        c_new = gate = None
        if mode in ("rnn_tanh", "rnn_relu"):
            a = _pre(xg + hg, bptt_clip)
            h_new = torch.tanh(a) if mode == "rnn_tanh" else torch.relu(a)
        elif mode == "lstm":
            ai, af, ag, ao = (_pre(x, bptt_clip) for x in (xg + hg).chunk(4, 1))
            i, f, g, o = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)
            c_new = f * c + i * g
            gate = f
            h_new = o * torch.tanh(c_new)
            if weight_hr is not None:
                h_new = h_new @ weight_hr.t()
        elif mode == "gru":
            xr, xz, xn = xg.chunk(3, 1)
            hr, hz, hn = hg.chunk(3, 1)
            r = torch.sigmoid(_pre(xr + hr, bptt_clip))
            z = torch.sigmoid(_pre(xz + hz, bptt_clip))
            n = torch.tanh(_pre(xn + r * hn, bptt_clip))
            h_new = (1 - z) * n + z * h
            gate = z
        else:
            raise ValueError(f"mode: expected 'rnn_tanh', 'rnn_relu', 'lstm' or 'gru', got {mode!r}")
        if steps is not None:
            if h_new.requires_grad:
                h_new.retain_grad()
            if c_new is not None and c_new.requires_grad:
                c_new.retain_grad()
            steps.append({"t": t, "h": h_new, "c": c_new, "gate": gate,
                          "mask": mask.squeeze(1)})
        h = torch.where(mask, h_new, h)
        if c_new is not None:
            c = torch.where(mask, c_new, c)
        outputs[t] = torch.where(mask, h_new, torch.zeros_like(h_new))
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
