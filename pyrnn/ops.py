"""The compiled ops as autograd-aware Python functions, one layer and one direction each.

Shapes: input [T, B, I], hx and cx [B, H], weight_ih [G*H, I], weight_hh [G*H, H],
bias_ih and bias_hh [G*H]; G = 1 (Elman), 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n): each
cell's facts come from the registry of the compiled library (CELLS, pyrnn._C.cells()).

``lengths`` ([B], int64, on the CPU) makes step t of sequence b run only while
t < lengths[b]: later steps leave its state unchanged and give zero output. With
``reverse=True`` the layer runs from each sequence's own last step back to step 0.

``bptt_clip=c > 0`` clamps the gradient of every gate pre-activation to [-c, c] inside
BPTT. ``norm_out``, a tensor of shape [2, T, B], is filled by the backward kernel with
the per-step L2 norms of dLoss/dh_t (row 0) and, for LSTM, dLoss/dc_t (row 1; zero for
the other cells). It is written in place when the backward runs (also under
torch.compile, where it must be a graph input such as a module buffer, not a tensor
created inside the compiled region).
"""
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from . import _C  # loads the library that registers torch.ops.pyrnn
from . import reference

# The registry of cells (csrc/cells/registry.h), by mode: gates, saved values, cell state,
# constants ({name: default}), workspace width in units of H (0: the output suffices)...
CELLS = {c["name"]: c for c in _C.cells()}
GATES = {name: c["gates"] for name, c in CELLS.items()}


def constants(mode: str, **given) -> list:
    """The constants of cell ``mode`` in the registry's order, from keyword arguments
    (missing ones at their defaults), as the ops' ``cell_params``."""
    params = CELLS[mode]["params"]
    unknown = set(given) - set(params)
    if unknown:
        raise TypeError(f"mode {mode!r} takes the constants {list(params)}, got "
                        f"{sorted(unknown)}")
    return [float(given.get(name, default)) for name, default in params.items()]


def _check_devices(input, lengths, **tensors):
    """The device checks of the compiled ops (csrc/checks.h), for the fake kernel: a tensor
    on the meta device selects it, and must not pass for a call the real kernels reject."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name}: expected device {input.device} (the device of input), "
                               f"got {t.device}")
    if lengths is not None and lengths.device.type != "cpu":
        raise RuntimeError(f"lengths: expected a CPU tensor, got device {lengths.device}")


@torch.library.register_fake("pyrnn::forward")
def _forward_fake(mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                  lengths, reverse, save, bptt_clip, norm_out, vanishing_penalty=0.0,
                  ratio_out=None, omega_out=None, cell_params=(), cell_weight=None):
    _check_devices(input, lengths, hx=hx, cx=cx, weight_ih=weight_ih, weight_hh=weight_hh,
                   bias_ih=bias_ih, bias_hh=bias_hh, weight_hr=weight_hr, norm_out=norm_out,
                   cell_weight=cell_weight)
    T, B = input.shape[0], input.shape[1]
    H, P = weight_hh.shape[0] // GATES[mode], weight_hh.shape[1]
    output = input.new_empty(T, B, P)
    h_n = input.new_empty(B, P)
    c_n = input.new_empty(B, H) if CELLS[mode]["has_cell"] else input.new_empty(0)
    width = CELLS[mode]["workspace"] * H
    workspace = input.new_empty(T, B, width) if (save and width) else input.new_empty(0)
    return output, h_n, c_n, workspace


@torch.library.register_fake("pyrnn::backward")
def _backward_fake(mode, grad_output, grad_h_n, grad_c_n, input, hx, cx, weight_ih, weight_hh,
                   weight_hr, has_bias, input_grad, lengths, output, workspace, reverse,
                   bptt_clip, record, vanishing_penalty=0.0, cell_params=(), cell_weight=None):
    _check_devices(input, lengths, grad_output=grad_output, grad_h_n=grad_h_n,
                   grad_c_n=grad_c_n, hx=hx, cx=cx, weight_ih=weight_ih, weight_hh=weight_hh,
                   weight_hr=weight_hr, output=output, workspace=workspace,
                   cell_weight=cell_weight)
    T, B = input.shape[0], input.shape[1]
    GH, P = weight_hh.shape
    H = GH // GATES[mode]
    return (
        input.new_empty(input.shape) if input_grad else input.new_empty(0),
        input.new_empty(B, P),
        input.new_empty(B, H) if CELLS[mode]["has_cell"] else input.new_empty(0),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        input.new_empty(GH) if has_bias else input.new_empty(0),
        input.new_empty(GH) if has_bias else input.new_empty(0),
        weight_hr.new_empty(weight_hr.shape) if weight_hr is not None else input.new_empty(0),
        input.new_empty(2, T, B) if record else input.new_empty(0),
        input.new_empty(T, B) if vanishing_penalty else input.new_empty(0),
        input.new_empty(()) if vanishing_penalty else input.new_empty(0),
        input.new_empty(cell_weight.shape) if cell_weight is not None else input.new_empty(0),
    )


# The autograd kernel of pyrnn::forward is C++ (csrc/autograd.cpp). With create_graph=True
# its backward takes the gradients from the reference formulation, through this op, whose
# composite implementation autograd records.
_LIB = torch.library.Library("pyrnn", "FRAGMENT")
_LIB.define(
    "reference_grads(str mode, Tensor?[] inputs, Tensor?[] grads, Tensor? lengths, "
    "bool reverse, float bptt_clip, int needs, bool record, float[] cell_params) -> Tensor[]")


def _reference_grads(mode, inputs, grads, lengths, reverse, bptt_clip, needs, record,
                     cell_params):
    """pyrnn.reference.layer_grads for the double backward of pyrnn::forward: inputs
    (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, cell_weight), bit
    k of needs for the k-th. Returns the nine gradients (empty where not needed) and the
    norms (empty unless record)."""
    flags = [bool(needs >> k & 1) for k in range(len(inputs))]
    got, norms = reference.layer_grads(mode, list(inputs), list(grads), lengths, reverse,
                                       bptt_clip, flags, record, list(cell_params))
    empty = inputs[0].new_empty(0)
    return [empty if g is None else g for g in got] + [empty if norms is None else norms]


_LIB.impl("reference_grads", _reference_grads, "CompositeImplicitAutograd")


def _no_double_backward(ctx, *grads):
    # pyrnn::forward's own backward never differentiates this op: with create_graph=True it
    # takes its gradients from pyrnn.reference.layer_grads instead.
    raise RuntimeError("pyrnn: torch.ops.pyrnn.backward is not differentiable; for double "
                       "backward differentiate through pyrnn.ops (or the modules), whose "
                       "backward with create_graph=True is differentiable")


def _backward_setup(ctx, inputs, output):
    pass


torch.library.register_autograd("pyrnn::backward", _no_double_backward,
                                setup_context=_backward_setup)


def _needs_save(*tensors):
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def _gate_stats(mode, out, workspace, H, lengths, params):
    """[2, T, B]: per step and sample, the mean over hidden units of the multiplicative
    factor on the gradient's path from h_t (c_t) back to step t-1, and the fraction of
    saturated units: see pyrnn.reference.gate_factor, which defines both for every cell.
    Zero at padded steps."""
    factor, saturated = reference.gate_factor(mode, out, workspace, H, params)
    stats = torch.stack([factor.mean(-1), saturated.to(out.dtype).mean(-1)])
    if lengths is not None:
        T = out.shape[0]
        mask = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)
        stats = stats * mask.to(device=out.device, dtype=out.dtype)
    return stats


def layer(mode: str, input: Tensor, hx: Tensor, cx: Optional[Tensor], weight_ih: Tensor,
          weight_hh: Tensor, bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
          lengths: Optional[Tensor] = None, reverse: bool = False, bptt_clip: float = 0.0,
          norm_out: Optional[Tensor] = None, weight_hr: Optional[Tensor] = None,
          gate_stats_out: Optional[Tensor] = None, vanishing_penalty: float = 0.0,
          ratio_out: Optional[Tensor] = None, omega_out: Optional[Tensor] = None,
          cell_params=(), cell_weight: Optional[Tensor] = None):
    """One layer in one direction of the cell ``mode`` (a name in CELLS). Returns
    (output, h_n, c_n); c_n is None unless the cell has a cell state (LSTM).
    cell_params: the cell's constants in the registry's order (see constants()); empty
    for their defaults.
    weight_hr [P, H] (LSTM only) projects h_t = W_hr (o_t * tanh(c_t)); hx is then [B, P].
    gate_stats_out, a [2, T, B] tensor, receives the forward's gate statistics (see
    _gate_stats); the gated cells then keep their activated gates even without grad.
    vanishing_penalty (Elman cells): see rnn_tanh; ratio_out [T, B] and omega_out (one
    element) receive the ratios and omega when the backward runs.
    cell_weight: the own weights of a layer-normalised cell (see ln_lstm; None: the
    initial ones); None for the other cells.
    Under torch.func's transforms (grad, vjp, jacrev, jvp, vmap, ...), with a
    forward-mode AD tangent (torch.autograd.forward_ad) and for complex dtypes (which
    torch.nn's modules take too) the layer runs as its reference formulation
    (pyrnn.reference), whose ATen ops they differentiate and batch; recording, clipping,
    gate statistics and the regulariser, which live in the fused kernels, raise
    NotImplementedError there."""
    if torch._C._are_functorch_transforms_active() or input.is_complex() or (
            _fwad._current_level >= 0 and _has_tangent(input, hx, cx, weight_ih, weight_hh,
                                                       bias_ih, bias_hh, weight_hr,
                                                       cell_weight)):
        return _transformed_layer(mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                                  lengths, reverse, bptt_clip, norm_out, weight_hr,
                                  gate_stats_out, vanishing_penalty, cell_params, cell_weight)
    if cell_weight is None and CELLS.get(mode, {}).get("layer_norm"):
        cell_weight = reference.initial_cell_weight(mode, weight_hh.shape[0] // GATES[mode],
                                                    input)
    save = _needs_save(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                       cell_weight)
    cell = CELLS[mode] if mode in CELLS else None
    keep = save or (gate_stats_out is not None and cell is not None and cell["keeps_row"])
    params = [float(v) for v in cell_params]
    out, h_n, c_n, workspace = torch.ops.pyrnn.forward(
        mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
        reverse, keep, float(bptt_clip), norm_out, float(vanishing_penalty), ratio_out,
        omega_out, params, cell_weight)
    if gate_stats_out is not None:
        with torch.no_grad():
            gate_stats_out.copy_(_gate_stats(mode, out, workspace, weight_hh.shape[0] //
                                             GATES[mode], lengths,
                                             params or constants(mode)))
    return out, h_n, (c_n if cell["has_cell"] else None)


def _has_tangent(*tensors):
    """Whether a tensor carries a forward-mode AD tangent at the current level."""
    return any(t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def _transformed_layer(mode, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                       reverse, bptt_clip, norm_out, weight_hr, gate_stats_out,
                       vanishing_penalty, cell_params, cell_weight):
    """layer() under a torch.func transform, with a forward AD tangent or for a complex
    dtype: the reference formulation."""
    features = {"bptt_clip": bptt_clip,
                "norm_out (record_grad_norms)": norm_out is not None,
                "gate_stats_out (record_gate_stats)": gate_stats_out is not None,
                "vanishing_penalty": vanishing_penalty}
    fused = [name for name, on in features.items() if on]
    if fused:
        why = (f"take float32 and float64 (a layer of {input.dtype} runs as its reference "
               "formulation)" if input.is_complex() else
               "torch.func's transforms and forward-mode AD cannot see (there a layer runs "
               "as its reference formulation); turn them off inside the transform or the "
               "dual level")
        raise NotImplementedError(f"pyrnn: {', '.join(fused)} run in the fused kernels, "
                                  f"which {why}")
    out, h_n, c_n = reference._run(mode, input, hx, cx, weight_ih, weight_hh, bias_ih,
                                   bias_hh, lengths, reverse, 0.0, None, weight_hr,
                                   params=list(cell_params) or None, cell_weight=cell_weight)
    return out, h_n, (c_n if CELLS[mode]["has_cell"] else None)


def rnn_tanh(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
             reverse=False, bptt_clip=0.0, norm_out=None, vanishing_penalty=0.0,
             ratio_out=None, omega_out=None):
    """Elman RNN with tanh: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh). -> (output, h_n)

    vanishing_penalty=lambda adds, in the backward, lambda * dOmega/dW_hh to W_hh's
    gradient, where Omega is the regulariser of Pascanu, Mikolov and Bengio (2013): for
    each sequence b and step k whose successor s (k + 1; k - 1 with reverse) lies within
    the sequence, v = dLoss/dh_s, u = W_hh^T (v * phi'(a_s)) (the part of dLoss/dh_k that
    flows through s; with bptt_clip, the clamped gate gradient), ratio = |u| / |v| (0 where
    |v| = 0) and Omega = (1/B) sum_b sum_k (ratio - 1)^2, differentiated with v and phi'
    held constant. ratio_out [T, B] (indexed by k, zero where k has no successor) and
    omega_out (one element) receive them when the backward runs."""
    out, h, _ = layer("rnn_tanh", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh,
                      lengths, reverse, bptt_clip, norm_out, vanishing_penalty=vanishing_penalty,
                      ratio_out=ratio_out, omega_out=omega_out)
    return out, h


def rnn_relu(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
             reverse=False, bptt_clip=0.0, norm_out=None, vanishing_penalty=0.0,
             ratio_out=None, omega_out=None):
    """Elman RNN with ReLU. -> (output, h_n). vanishing_penalty etc. as for rnn_tanh."""
    out, h, _ = layer("rnn_relu", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh,
                      lengths, reverse, bptt_clip, norm_out, vanishing_penalty=vanishing_penalty,
                      ratio_out=ratio_out, omega_out=omega_out)
    return out, h


def rnn_leaky_relu(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
                   reverse=False, bptt_clip=0.0, norm_out=None, vanishing_penalty=0.0,
                   ratio_out=None, omega_out=None, negative_slope=0.01):
    """Elman RNN with leaky ReLU: h_t = a if a > 0 else negative_slope * a, for
    a = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh (negative_slope: finite, >= 0).
    -> (output, h_n). vanishing_penalty etc. as for rnn_tanh."""
    out, h, _ = layer("rnn_leaky_relu", input, hx, None, weight_ih, weight_hh, bias_ih,
                      bias_hh, lengths, reverse, bptt_clip, norm_out,
                      vanishing_penalty=vanishing_penalty, ratio_out=ratio_out,
                      omega_out=omega_out, cell_params=[negative_slope])
    return out, h


def lstm(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
         reverse=False, bptt_clip=0.0, norm_out=None, weight_hr=None):
    """LSTM, gates i, f, g, o; optional projection weight_hr [P, H]. -> (output, h_n, c_n)"""
    return layer("lstm", input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                 reverse, bptt_clip, norm_out, weight_hr)


def gru(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
        reverse=False, bptt_clip=0.0, norm_out=None):
    """GRU, PyTorch's variant (reset gate applied to W_hn h + b_hn). -> (output, h_n)"""
    out, h, _ = layer("gru", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh,
                      lengths, reverse, bptt_clip, norm_out)
    return out, h


def ln_lstm(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
            reverse=False, bptt_clip=0.0, norm_out=None, cell_weight=None, eps=1e-5):
    """LayerNorm-LSTM (Ba, Kiros and Hinton 2016), gates i, f, g, o:
    a = LN(W_ih x_t) gamma_ih + b_ih + LN(W_hh h_{t-1}) gamma_hh + b_hh,
    c_t = f c_{t-1} + i g, h_t = o tanh(LN(c_t) gamma_c + beta_c), with LN the layer norm
    over the vector (4H entries, or H) of torch.nn.functional.layer_norm (biased variance,
    eps added to it). cell_weight [10 H] = [gamma_ih 4H | gamma_hh 4H | gamma_c H |
    beta_c H]; None: the initial one (gains 1, beta_c 0). -> (output, h_n, c_n)"""
    return layer("ln_lstm", input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                 reverse, bptt_clip, norm_out, cell_params=[eps], cell_weight=cell_weight)
