"""Initialisations of recurrent weights that keep gradients alive through time.

In place, named as ``torch.nn.init`` names things (a trailing underscore), and each
returns the module it was given. Each works on pyrnn's and torch.nn's recurrent modules
alike (RNN, LSTM, GRU and their cells, any number of layers and directions), and on a
container: every recurrent module inside it is initialised.

W_hh is [G * H, P] with G gate blocks of H rows (G = 1 Elman, 4 LSTM i, f, g, o,
3 GRU r, z, n); the schemes below act on each gate block separately.

- ``identity_``: each block of W_hh the identity (times ``gain``), biases zero: the IRNN
  of Le, Jaitly and Hinton (2015), meant for the ReLU Elman RNN.
- ``orthogonal_``: each block of W_hh a random (semi-)orthogonal matrix (Saxe et al. 2014),
  all singular values ``gain``.
- ``spectral_radius_``: each block of W_hh scaled so that its largest absolute eigenvalue
  is ``rho`` (its direction is kept).
- ``forget_bias_``: LSTM only; the forget gate's bias_ih + bias_hh equal ``value`` (Gers,
  Schmidhuber and Cummins 2000; Jozefowicz, Zaremba and Sutskever 2015 use 1).
- ``chrono_``: LSTM only; Tallec and Ollivier (2018): forget bias log(u), u ~ U(1, t_max - 1)
  per unit, input bias its negative, so that the forget gates start with characteristic
  times spread over [1, t_max].

The forget and input biases are written into bias_ih; the matching entries of bias_hh
are set to zero, so that the sum the gate sees is the value stated.
"""
import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["identity_", "orthogonal_", "spectral_radius_", "forget_bias_", "chrono_",
           "recurrent_modules", "gates_of"]


def recurrent_modules(module: nn.Module) -> Iterator[nn.Module]:
    """The recurrent modules (torch.nn.RNNBase or RNNCellBase, which pyrnn's derive from)
    in ``module``, itself included."""
    for m in module.modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            yield m


def gates_of(m: nn.Module) -> int:
    """Number of gate blocks in W_hh: 1 (Elman), 4 (LSTM), 3 (GRU)."""
    if isinstance(m, (nn.LSTM, nn.LSTMCell)) or getattr(m, "mode", None) == "LSTM":
        return 4
    if isinstance(m, (nn.GRU, nn.GRUCell)) or getattr(m, "mode", None) == "GRU":
        return 3
    return 1


def _is_lstm(m: nn.Module) -> bool:
    return gates_of(m) == 4


def _layers(m: nn.Module) -> Iterator[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
    """(weight_hh, bias_ih, bias_hh) of every layer and direction of one recurrent module."""
    if isinstance(m, nn.RNNCellBase):
        suffixes = [""]
    else:
        D = 2 if m.bidirectional else 1
        suffixes = [f"_l{k}" + ("_reverse" if d else "") for k in range(m.num_layers)
                    for d in range(D)]
    for s in suffixes:
        w = getattr(m, "weight_hh" + s)
        b_ih = getattr(m, "bias_ih" + s, None) if m.bias else None
        b_hh = getattr(m, "bias_hh" + s, None) if m.bias else None
        yield w, b_ih, b_hh


def _modules(module: nn.Module, what: str, lstm_only: bool = False):
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    found = list(recurrent_modules(module))
    if not found:
        raise TypeError(f"module: expected a recurrent module (RNN, LSTM, GRU or a cell, from "
                        f"pyrnn or torch.nn) or one that contains some, got "
                        f"{type(module).__name__}")
    if lstm_only:
        others = [type(m).__name__ for m in found if not _is_lstm(m)]
        if others:
            raise TypeError(f"module: {what} applies to LSTM and LSTMCell only, got "
                            f"{', '.join(others)}")
        no_bias = [type(m).__name__ for m in found if not m.bias]
        if no_bias:
            raise ValueError(f"module: {what} sets biases, but {', '.join(no_bias)} was built "
                             f"with bias=False")
    return found


def _blocks(m: nn.Module, w: Tensor):
    G = gates_of(m)
    H = w.shape[0] // G
    return [w[g * H:(g + 1) * H] for g in range(G)]


@torch.no_grad()
def identity_(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """IRNN (Le, Jaitly and Hinton 2015): every gate block of W_hh set to ``gain`` times the
    identity (torch.nn.init.eye_ for a projected LSTM's [H, P] blocks), all recurrent
    biases (bias_ih and bias_hh) to zero. Returns ``module``."""
    for m in _modules(module, "identity_"):
        for w, b_ih, b_hh in _layers(m):
            for blk in _blocks(m, w):
                nn.init.eye_(blk)
                blk.mul_(gain)
            for b in (b_ih, b_hh):
                if b is not None:
                    b.zero_()
    return module


@torch.no_grad()
def orthogonal_(module: nn.Module, gain: float = 1.0,
                generator: Optional[torch.Generator] = None) -> nn.Module:
    """Every gate block of W_hh a random orthogonal matrix times ``gain``
    (torch.nn.init.orthogonal_ per block; semi-orthogonal for a projected LSTM's [H, P]
    blocks). Biases are left as they are. Returns ``module``."""
    for m in _modules(module, "orthogonal_"):
        for w, _, _ in _layers(m):
            for blk in _blocks(m, w):
                nn.init.orthogonal_(blk, gain=gain, generator=generator)
    return module


def spectral_radius(w: Tensor) -> float:
    """The largest absolute eigenvalue of a square matrix (computed in float64)."""
    return float(torch.linalg.eigvals(w.detach().double().cpu()).abs().max())


@torch.no_grad()
def spectral_radius_(module: nn.Module, rho: float) -> nn.Module:
    """Scale every gate block of W_hh (for the Elman RNN, W_hh itself) so that its largest
    absolute eigenvalue is ``rho``, keeping its direction. The blocks must be square
    (not a projected LSTM) and not nilpotent. Returns ``module``."""
    if not (isinstance(rho, (int, float)) and rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho: expected a finite number >= 0, got {rho!r}")
    for m in _modules(module, "spectral_radius_"):
        for w, _, _ in _layers(m):
            for blk in _blocks(m, w):
                if blk.shape[0] != blk.shape[1]:
                    raise ValueError(f"module: spectral_radius_ needs square blocks of W_hh, "
                                     f"got {tuple(blk.shape)} (an LSTM with proj_size)")
                r = spectral_radius(blk)
                if r == 0.0:
                    raise ValueError("module: a block of W_hh has spectral radius 0 and "
                                     "cannot be scaled to another")
                blk.mul_(rho / r)
    return module


def _gate_bias(m, b_ih, b_hh, gate, values):
    H = b_ih.shape[0] // 4
    sl = slice(gate * H, (gate + 1) * H)
    b_ih[sl] = values
    b_hh[sl] = 0.0


@torch.no_grad()
def forget_bias_(module: nn.Module, value: float = 1.0) -> nn.Module:
    """LSTM: the forget gate's bias_ih + bias_hh set to ``value`` (bias_ih holds it,
    bias_hh is zero there); the other gates' biases are left as they are. Returns
    ``module``."""
    for m in _modules(module, "forget_bias_", lstm_only=True):
        for _, b_ih, b_hh in _layers(m):
            _gate_bias(m, b_ih, b_hh, 1, float(value))
    return module


@torch.no_grad()
def chrono_(module: nn.Module, t_max: float,
            generator: Optional[torch.Generator] = None) -> nn.Module:
    """Chrono initialisation (Tallec and Ollivier 2018), LSTM: per unit, forget bias
    b_f = log(u) with u ~ U(1, t_max - 1), input bias b_i = -b_f (in bias_ih; bias_hh is
    zero at those gates). ``t_max`` is the longest dependency expected, > 2. Returns
    ``module``."""
    if not (isinstance(t_max, (int, float)) and t_max > 2 and math.isfinite(t_max)):
        raise ValueError(f"t_max: expected a finite number > 2, got {t_max!r}")
    for m in _modules(module, "chrono_", lstm_only=True):
        for _, b_ih, b_hh in _layers(m):
            H = b_ih.shape[0] // 4
            u = torch.rand(H, generator=generator, dtype=torch.float64)
            b_f = torch.log(1.0 + u * (t_max - 2.0)).to(b_ih.dtype)
            _gate_bias(m, b_ih, b_hh, 1, b_f.to(b_ih.device))
            _gate_bias(m, b_ih, b_hh, 0, -b_f.to(b_ih.device))
    return module
