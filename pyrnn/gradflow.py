"""Analysis of the per-step gradient norms that pyrnn's backward kernels record.

A module built with ``record_grad_norms=True`` exposes, after each backward,
``module.grad_norms.hidden`` (and ``.cell`` for LSTM): ||dLoss/dh_t|| per layer and
direction, time step and sample, shaped [L * D, T, B]. The functions here reduce such a
record to the numbers that tell whether gradients vanish or explode through time.

Distance from the loss: for a loss on the last step, the gradient at step t has travelled
T - 1 - t steps back. ``decay_rate`` fits log ||dLoss/dh_t|| against that distance by least
squares and returns the per-step factor exp(slope): < 1 means the gradient shrinks by that
factor with every step it travels back (vanishing), > 1 means it grows (exploding).
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import Tensor

VANISHING, EXPLODING, STABLE = "vanishing", "exploding", "stable"


@dataclass
class FlowStats:
    """Summary of one gradient-norm curve (norm against time step)."""

    decay_rate: float      # per-step factor of the fitted exponential (1 = no change)
    half_life: float       # steps for the norm to halve (inf if it does not shrink)
    first_last_ratio: float  # ||dLoss/dh_0|| / ||dLoss/dh_{T-1}||
    flag: str              # "vanishing", "exploding" or "stable"

    def __str__(self):
        return (f"decay {self.decay_rate:.4f}/step, half-life {self.half_life:.1f} steps, "
                f"first/last {self.first_last_ratio:.3g} ({self.flag})")


def curve(norms: Tensor, reduce: str = "mean") -> Tensor:
    """One curve over time from a [T] , [T, B] or [L * D, T, B] record: the batch is
    reduced (mean of norms, or 'rms'), layers are kept. Returns [T] or [L * D, T]."""
    if norms.dim() == 1:
        return norms
    x = norms.double()
    if reduce == "rms":
        return x.pow(2).mean(-1).sqrt()
    if reduce == "mean":
        return x.mean(-1)
    raise ValueError(f"reduce: expected 'mean' or 'rms', got {reduce!r}")


def decay_rate(norms: Tensor, loss_step: Optional[int] = None) -> float:
    """Per-step factor exp(slope) of log-norm against distance from the loss step.

    norms: [T] (or anything ``curve`` reduces to [T]); loss_step defaults to T - 1.
    Steps with a zero norm (padding) are left out of the fit.
    """
    c = curve(norms)
    if c.dim() != 1:
        raise ValueError(f"norms: expected one curve (a [T] or [T, B] tensor), got shape {tuple(norms.shape)}")
    T = c.shape[0]
    loss_step = T - 1 if loss_step is None else loss_step
    t = torch.arange(T, dtype=torch.float64)
    keep = (c > 0) & (t <= loss_step)
    if int(keep.sum()) < 2:
        return 1.0
    d = (loss_step - t)[keep]
    y = c[keep].double().log()
    d0, y0 = d.mean(), y.mean()
    var = ((d - d0) ** 2).sum()
    slope = float(((d - d0) * (y - y0)).sum() / var) if var > 0 else 0.0
    return math.exp(slope)


def half_life(rate: float) -> float:
    """Steps for a norm shrinking by ``rate`` per step to halve (inf if rate >= 1)."""
    if rate >= 1.0 or rate <= 0.0:
        return math.inf
    return math.log(0.5) / math.log(rate)


def analyse(norms: Tensor, vanish_below: float = 1e-3, explode_above: float = 1e3,
            loss_step: Optional[int] = None) -> FlowStats:
    """FlowStats of one curve. The flag compares the first-to-last ratio (over the fitted
    range) with the two thresholds."""
    c = curve(norms)
    T = c.shape[0]
    last = T - 1 if loss_step is None else loss_step
    rate = decay_rate(c, last)
    nz = c[: last + 1]
    first = float(nz[0])
    end = float(nz[last])
    # no gradient even at the loss step means nothing flows at all: a ratio of 0
    ratio = first / end if end > 0 else (math.inf if first > 0 else 0.0)
    flag = VANISHING if ratio < vanish_below else EXPLODING if ratio > explode_above else STABLE
    return FlowStats(rate, half_life(rate), ratio, flag)


def analyse_module(module, **kw) -> Dict[str, FlowStats]:
    """FlowStats per layer and direction of a module's last recorded norms, keyed
    'l0', 'l0_reverse', ...; LSTM cell-state curves are keyed 'l0/cell' etc."""
    g = module.grad_norms
    if g is None:
        raise RuntimeError("grad_norms: nothing recorded; build the module with "
                           "record_grad_norms=True and run a backward pass first")
    D = 2 if module.bidirectional else 1
    out = {}
    for k in range(g.hidden.shape[0]):
        name = f"l{k // D}" + ("_reverse" if k % D else "")
        out[name] = analyse(g.hidden[k], **kw)
        if g.cell is not None:
            out[name + "/cell"] = analyse(g.cell[k], **kw)
    return out


def plot(records: Union[Tensor, Dict[str, Tensor]], path: Optional[str] = None, title: str = "",
         ax=None):
    """Draws ||dLoss/dh_t|| against time step on a log scale, one line per layer (and per
    record when given a dict {label: norms [L*D, T, B] or [T, B] or [T]}). Needs matplotlib
    (pip install pyrnn[plot]). Saves to ``path`` if given; returns the figure."""
    try:
        import matplotlib
        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pyrnn.gradflow.plot needs matplotlib: pip install matplotlib") from e
    if isinstance(records, Tensor):
        records = {"": records}
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    for label, norms in records.items():
        c = curve(norms)
        rows = c.unsqueeze(0) if c.dim() == 1 else c
        for k in range(rows.shape[0]):
            y = rows[k].clamp_min(1e-30).cpu().numpy()
            name = label if rows.shape[0] == 1 else f"{label} layer {k}".strip()
            ax.semilogy(range(len(y)), y, label=name or None)
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dLoss/dh_t|| (batch mean)")
    if title:
        ax.set_title(title)
    if any(records.keys()):
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
            plt.close(fig)
    return fig if fig is not None else ax.figure


# The bound gamma of the activation's derivative on the path back through one step of an
# Elman RNN, h_t = phi(W_hh h_{t-1} + ...): |phi'| <= 1 for tanh and ReLU, 1/4 for the
# sigmoid. Pascanu, Mikolov and Bengio (2013): a largest singular value of W_hh below
# 1 / gamma is sufficient for the gradient to vanish (each step multiplies its norm by at
# most sigma_max * gamma < 1), and above it necessary for it to explode.
GAMMA = {"tanh": 1.0, "relu": 1.0, "leaky_relu": 1.0, "sigmoid": 0.25}


def activation_gamma(module) -> Optional[float]:
    """gamma of an Elman module's activation (None for LSTM and GRU, whose gradient also
    travels on the gated paths the bound does not cover)."""
    mode = getattr(module, "mode", None)
    if mode in ("RNN_TANH", "RNN_RELU", "RNN_LEAKY_RELU"):
        # leaky ReLU: its derivative is 1 or negative_slope, so 1 bounds it when the
        # slope is at most 1
        return max(1.0, getattr(module, "negative_slope", 1.0)) if mode == "RNN_LEAKY_RELU" \
            else GAMMA[mode[4:].lower()]
    nl = getattr(module, "nonlinearity", None)
    if mode is None and nl in GAMMA and not hasattr(module, "num_layers"):
        return GAMMA[nl]
    return None


def largest_singular_value(weight_hh: Tensor, gates: int = 1) -> float:
    """The largest singular value over W_hh's gate blocks ([G * H, P] -> G blocks)."""
    w = weight_hh.detach().double()
    H = w.shape[0] // gates
    return max(float(torch.linalg.matrix_norm(w[g * H:(g + 1) * H], ord=2))
               for g in range(gates))
