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
    H = weight_hh.shape[1]
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
