"""Drop-in replacements for torch.nn.RNN, LSTM and GRU, running on pyrnn's fused ops.

The classes derive from torch.nn.RNNBase, so constructor arguments, parameter names,
shapes, initialisation and state_dict layout are torch.nn's own; only forward differs.
(They derive from RNNBase rather than from torch.nn.LSTM etc. so that torch.compile
traces them instead of breaking the graph.)
"""
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import ops

_MODES = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}


class GradNorms:
    """Per-step gradient norms recorded by the backward kernels.

    hidden: [L * D, T, B], ||dLoss/dh_t|| over hidden units, indexed by input position t
            for both directions; zero at padded steps.
    cell:   same shape, ||dLoss/dc_t|| (LSTM only, else None).
    ratio:  same shape, with vanishing_penalty on (Elman cells): ||u|| / ||v|| of the
            regulariser, for each step k whose successor lies within its sequence (zero
            elsewhere); see pyrnn.ops.rnn_tanh. None otherwise.
    """

    def __init__(self, hidden: Tensor, cell: Optional[Tensor], ratio: Optional[Tensor] = None):
        self.hidden = hidden
        self.cell = cell
        self.ratio = ratio

    def __repr__(self):
        return f"GradNorms(hidden={tuple(self.hidden.shape)}, cell={None if self.cell is None else tuple(self.cell.shape)})"


class GateStats:
    """Per-step statistics of the gates, recorded by the forward (record_gate_stats=True).

    factor:    [L * D, T, B], the mean over hidden units of the multiplicative factor on
               the gradient's path back through one step: the forget gate f_t (LSTM),
               1 - z_t (GRU), the activation's derivative (RNN: 1 - h_t^2 or 1[h_t > 0]).
    saturated: same shape, the fraction of units whose gate (Elman: activation) is
               saturated: a sigmoid gate outside [0.05, 0.95], |h_t| > 0.95 for tanh,
               h_t = 0 for ReLU.
    Indexed by input position t for both directions; zero at padded steps.
    """

    def __init__(self, factor: Tensor, saturated: Tensor):
        self.factor = factor
        self.saturated = saturated

    def __repr__(self):
        return f"GateStats(factor={tuple(self.factor.shape)}, saturated={tuple(self.saturated.shape)})"


def _unpack(seq: PackedSequence):
    """(padded [T, B, *], lengths [B] int64, rows) for a PackedSequence, in its sorted batch
    order; rows[i] is the row of padded.view(T * B, *) that holds seq.data[i]."""
    bs = seq.batch_sizes  # [T] int64 on the CPU
    T, B = bs.shape[0], int(bs[0])
    step = torch.repeat_interleave(torch.arange(T), bs)
    first = torch.cumsum(bs, 0) - bs  # data index of each step's first row
    rows = step * B + (torch.arange(step.shape[0]) - first[step])
    lengths = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)
    rows = rows.to(seq.data.device)
    flat = seq.data.new_zeros(T * B, seq.data.shape[1]).index_copy(0, rows, seq.data)
    return flat.view(T, B, -1), lengths, rows


class _Base(nn.RNNBase):
    """Shared forward of pyrnn.RNN, LSTM and GRU."""

    def __init__(self, mode, *args, bptt_clip: float = 0.0, record_grad_norms: bool = False,
                 record_gate_stats: bool = False, vanishing_penalty: float = 0.0, **kwargs):
        super().__init__(mode, *args, **kwargs)
        self.bptt_clip = float(bptt_clip)
        self.vanishing_penalty = float(vanishing_penalty)
        self._check_penalty()
        self._vanishing_omega = None  # [L * D] of the last backward with the penalty on
        self._ratio_store = None      # [L * D, T, B] likewise, while recording
        self.record_grad_norms = bool(record_grad_norms)
        self.record_gate_stats = bool(record_gate_stats)
        self._gate_stats = None  # [L * D, 2, T, B] of the last recording forward
        self._gate_order = None
        # The backward kernels write the norms into this store (see reserve_grad_norms);
        # _norm_shape is the (T, B) of the last recording forward, _norm_order the batch
        # order of its packed input.
        # A plain attribute, not a buffer: no state_dict entry, no DDP broadcast.
        self._grad_norm_store = torch.zeros(0)
        self._norm_shape = None
        self._norm_order = None

    def flatten_parameters(self) -> None:
        """No-op: pyrnn's kernels read the parameters where they are."""

    def _apply(self, fn, recurse=True):
        # RNNBase._apply re-flattens for cuDNN; pyrnn has nothing to flatten.
        return nn.Module._apply(self, fn, recurse)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("bptt_clip", 0.0)
        self.__dict__.setdefault("vanishing_penalty", 0.0)
        self.__dict__.setdefault("_vanishing_omega", None)
        self.__dict__.setdefault("_ratio_store", None)
        self.__dict__.setdefault("record_grad_norms", False)
        self.__dict__.setdefault("_norm_shape", None)
        self.__dict__.setdefault("record_gate_stats", False)
        self.__dict__.setdefault("_gate_stats", None)
        self.__dict__.setdefault("_gate_order", None)
        self.__dict__.setdefault("_norm_order", None)
        self.__dict__.setdefault("_grad_norm_store", torch.zeros(0))

    def _check_penalty(self):
        if self.vanishing_penalty and self.mode not in ("RNN_TANH", "RNN_RELU"):
            raise ValueError(f"vanishing_penalty: the vanishing-gradient regulariser is defined "
                             f"for the Elman RNN (tanh, relu) only, got "
                             f"{self.vanishing_penalty} for {self.mode}")

    @property
    def vanishing_omega(self) -> Optional[Tensor]:
        """Omega of the regulariser per layer and direction ([L * D]), as computed by the last
        backward through a forward with vanishing_penalty on (None before any)."""
        return None if self._vanishing_omega is None else self._vanishing_omega.clone()

    @property
    def grad_norms(self) -> Optional[GradNorms]:
        """The norms recorded by the backward through this module's last recording forward
        (None before any such backward). A copy: later backward passes do not change it."""
        if self._norm_shape is None:
            return None
        T, B = self._norm_shape
        g = self._grad_norm_store[:, :, :T, :B]
        # The forward marks its slots with -1; a layer whose backward never ran (the loss
        # does not depend on it) keeps them, and its gradient is zero.
        if not bool((g >= 0).any()):
            return None
        g = g.clamp_min(0)
        ratio = self._ratio_store
        if self._norm_order is not None:
            g = g.index_select(3, self._norm_order)
            ratio = None if ratio is None else ratio.index_select(2, self._norm_order)
        return GradNorms(g[:, 0], g[:, 1] if self.mode == "LSTM" else None,
                         None if ratio is None else ratio.clone())

    @property
    def gate_stats(self) -> Optional[GateStats]:
        """The gate statistics of the last forward with record_gate_stats on (None if none)."""
        g = self._gate_stats
        if g is None:
            return None
        if self._gate_order is not None:
            g = g.index_select(3, self._gate_order)
        return GateStats(g[:, 0], g[:, 1])

    def _norm_store_fits(self, steps, batch, dtype, device) -> bool:
        s = self._grad_norm_store
        return (s.dim() == 4 and s.shape[2] >= steps and s.shape[3] >= batch
                and s.dtype == dtype and s.device == device)

    @torch.compiler.disable(reason="record_grad_norms: the store for the norms is too small "
                            "for this input; under fullgraph=True call "
                            "module.reserve_grad_norms(T, B) eagerly before compiling")
    def reserve_grad_norms(self, steps: int, batch: int, dtype: Optional[torch.dtype] = None):
        """Make room to record the norms of sequences of up to ``steps`` steps and batches of
        up to ``batch`` (in ``dtype``, by default the parameters'). The forward calls this
        itself when the room is short; under torch.compile that call is a graph break, so
        with ``fullgraph=True`` call it once, eagerly, before the compiled module runs."""
        LD = self.num_layers * (2 if self.bidirectional else 1)
        w = self.weight_ih_l0
        dtype = w.dtype if dtype is None else dtype
        if self._norm_store_fits(steps, batch, dtype, w.device):
            return
        store = self._grad_norm_store
        if store.dim() == 4 and store.dtype == dtype and store.device == w.device:
            steps, batch = max(steps, store.shape[2]), max(batch, store.shape[3])
        self._grad_norm_store = torch.full((LD, 2, steps, batch), -1.0, dtype=dtype,
                                           device=w.device)

    def _weights(self, layer, direction):
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of one layer and direction."""
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        w = [getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx)]
        w += [getattr(self, "bias_ih" + sfx), getattr(self, "bias_hh" + sfx)] if self.bias else [None, None]
        w.append(getattr(self, "weight_hr" + sfx) if self.proj_size > 0 else None)
        return w

    def _check_input(self, x: Tensor, packed: bool):
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a Tensor or PackedSequence, got {type(x).__name__}")
        if not (x.is_floating_point()):
            raise TypeError(f"input: expected a floating-point tensor (float32 or float64), got {x.dtype}")
        if not packed and x.dim() not in (2, 3):
            raise ValueError(f"input: expected a 2-D (unbatched) or 3-D (batched) tensor, got "
                             f"{x.dim()}-D of shape {tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input: expected input_size {self.input_size} in the last "
                             f"dimension, got {x.shape[-1]} (shape {tuple(x.shape)})")
        w = self.weight_ih_l0
        if x.device != w.device:
            raise ValueError(f"input: expected device {w.device} (the parameters' device), got {x.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input: expected dtype {w.dtype} (the parameters' dtype), got {x.dtype}")

    def _check_state(self, name, h, B, unbatched, x, size):
        D = 2 if self.bidirectional else 1
        expected = (self.num_layers * D, size) if unbatched else (self.num_layers * D, B, size)
        if not isinstance(h, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(h).__name__}")
        if tuple(h.shape) != expected:
            what = "proj_size" if size != self.hidden_size else "hidden_size"
            raise ValueError(f"{name}: expected shape {expected} (num_layers * num_directions, "
                             f"{'' if unbatched else 'batch, '}{what}), got {tuple(h.shape)}")
        if h.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the input's), got {h.device}")
        if h.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name}: expected dtype {x.dtype} (the input's), got {h.dtype}")

    def forward(self, input, hx=None):
        mode = _MODES[self.mode]
        is_lstm = mode == "lstm"
        packed = isinstance(input, PackedSequence)
        unbatched = False
        lengths = None
        sorted_idx = unsorted_idx = None
        if packed:
            self._check_input(input.data, True)
            sorted_idx, unsorted_idx = input.sorted_indices, input.unsorted_indices
            # Padded [T, B, I] in the packed (sorted) order, as torch.nn runs it: one
            # scatter of the packed rows, and one gather back for the output.
            x, lengths, rows = _unpack(input)
        else:
            self._check_input(input, False)
            if input.dim() == 2:
                unbatched = True
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
        T, B = x.shape[0], x.shape[1]
        if T == 0:
            raise ValueError("input: expected at least one time step, got an empty sequence")
        D = 2 if self.bidirectional else 1
        LD = self.num_layers * D
        H = self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H  # width of h

        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            # The fused kernels run in float32 under autocast (see README, "Precision").
            dtype = torch.float32
            x = x.to(dtype)

        if hx is None:
            h0 = x.new_zeros(LD, B, P)
            c0 = x.new_zeros(LD, B, H) if is_lstm else None
        else:
            if is_lstm:
                if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                    raise TypeError("hx: expected a tuple (h_0, c_0) for LSTM, got "
                                    f"{type(hx).__name__}")
                h0, c0 = hx
                ref = input.data if packed else input
                self._check_state("hx[0] (h_0)", h0, B, unbatched, ref, P)
                self._check_state("hx[1] (c_0)", c0, B, unbatched, ref, H)
            else:
                if isinstance(hx, (tuple, list)):
                    raise TypeError(f"hx: expected a Tensor for {self.mode}, got a {type(hx).__name__}")
                h0, c0 = hx, None
                self._check_state("hx", h0, B, unbatched, input.data if packed else input, H)
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            if packed and sorted_idx is not None:
                h0 = h0.index_select(1, sorted_idx)
                c0 = c0.index_select(1, sorted_idx) if c0 is not None else None
            h0 = h0.to(dtype)
            c0 = c0.to(dtype) if c0 is not None else None

        store = None
        if self.record_grad_norms and torch.is_grad_enabled():
            # The backward ops write the norms into the store the module keeps (pyrnn.ops,
            # norm_out), which torch.compile sees as a graph input. A forward without grad
            # (evaluation) keeps the last record.
            if not self._norm_store_fits(T, B, dtype, x.device):
                self.reserve_grad_norms(T, B, dtype)
            store = self._grad_norm_store[:, :, :T, :B]
            store.fill_(-1.0)
            self._norm_shape = (T, B)
            self._norm_order = unsorted_idx if packed else None

        omega = ratios = None
        if self.vanishing_penalty:
            self._check_penalty()
            if torch.is_grad_enabled():
                omega = x.new_zeros(LD)
                self._vanishing_omega = omega
                ratios = x.new_zeros(LD, T, B) if store is not None else None
                self._ratio_store = ratios
        elif store is not None:
            self._ratio_store = None

        stats = None
        if self.record_gate_stats:
            stats = x.new_zeros(LD, 2, T, B)
            self._gate_stats = stats
            self._gate_order = unsorted_idx if packed else None

        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = (
                    None if w is None else w.to(dtype) for w in self._weights(layer, d))
                out, h, c = ops.layer(
                    mode, layer_input, h0[k], c0[k] if is_lstm else None, w_ih, w_hh, b_ih,
                    b_hh, lengths, d == 1, self.bptt_clip, None if store is None else store[k],
                    w_hr, None if stats is None else stats[k],
                    vanishing_penalty=self.vanishing_penalty if omega is not None else 0.0,
                    ratio_out=None if ratios is None else ratios[k],
                    omega_out=None if omega is None else omega[k:k + 1])
                outs.append(out)
                h_n.append(h)
                if is_lstm:
                    c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if is_lstm else None

        if packed:
            data = output.reshape(T * B, output.shape[2]).index_select(0, rows)
            output = PackedSequence(data, input.batch_sizes, sorted_idx, unsorted_idx)
            if unsorted_idx is not None:
                h_n = h_n.index_select(1, unsorted_idx)
                c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None
        elif unbatched:
            output = output.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if is_lstm else h_n)


class RNN(_Base):
    """Elman RNN, a drop-in for torch.nn.RNN (same arguments, parameters and results).

    Extra keyword arguments: bptt_clip (clamp gate pre-activation gradients inside BPTT
    to [-c, c]; 0 = off), record_grad_norms (see grad_norms), record_gate_stats (see
    gate_stats) and vanishing_penalty (the vanishing-gradient regulariser of Pascanu et al.
    2013, see pyrnn.ops.rnn_tanh; Omega per layer in vanishing_omega; Elman cells only).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 **kwargs):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, **kwargs)


class LSTM(_Base):
    """LSTM, a drop-in for torch.nn.LSTM. Extra keywords as for pyrnn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 **kwargs):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, device=device, dtype=dtype, **kwargs)


class GRU(_Base):
    """GRU (PyTorch's variant), a drop-in for torch.nn.GRU. Extra keywords as for pyrnn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, **kwargs):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype, **kwargs)


class _CellMixin:
    """One fused step of the cell: the layer op with T = 1 (the same kernels and cell math)."""

    _mode = None

    def _step(self, input, hx, cx):
        if not isinstance(input, Tensor) or not input.is_floating_point():
            raise TypeError(f"input: expected a floating-point tensor, got "
                            f"{input.dtype if isinstance(input, Tensor) else type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"input: expected a 1-D (unbatched) or 2-D tensor [B, input_size], "
                             f"got {input.dim()}-D of shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input: expected input_size {self.input_size} in the last "
                             f"dimension, got {input.shape[-1]}")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        B, H = x.shape[0], self.hidden_size
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        states = []
        for name, s in (("hx", hx), ("cx", cx)):
            if s is None:
                states.append(x.new_zeros(B, H) if (name == "hx" or self._mode == "lstm") else None)
                continue
            expected = (H,) if unbatched else (B, H)
            if tuple(s.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected}, got {tuple(s.shape)}")
            states.append((s.unsqueeze(0) if unbatched else s).to(dtype))
        h0, c0 = states
        b_ih = self.bias_ih.to(dtype) if self.bias else None
        b_hh = self.bias_hh.to(dtype) if self.bias else None
        _, h, c = ops.layer(self._mode, x.unsqueeze(0), h0, c0, self.weight_ih.to(dtype),
                            self.weight_hh.to(dtype), b_ih, b_hh)
        if unbatched:
            h = h.squeeze(0)
            c = c.squeeze(0) if c is not None else None
        return h, c


class RNNCell(_CellMixin, nn.RNNCell):
    """Elman RNN cell, a drop-in for torch.nn.RNNCell."""

    @property
    def _mode(self):
        return "rnn_tanh" if self.nonlinearity == "tanh" else "rnn_relu"

    def forward(self, input, hx=None):
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {self.nonlinearity!r}")
        return self._step(input, hx, None)[0]


class LSTMCell(_CellMixin, nn.LSTMCell):
    """LSTM cell, a drop-in for torch.nn.LSTMCell."""

    _mode = "lstm"

    def forward(self, input, hx=None):
        h0, c0 = (None, None) if hx is None else hx
        return self._step(input, h0, c0)


class GRUCell(_CellMixin, nn.GRUCell):
    """GRU cell, a drop-in for torch.nn.GRUCell."""

    _mode = "gru"

    def forward(self, input, hx=None):
        return self._step(input, hx, None)[0]


_REPLACEMENTS = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU,
                 nn.RNNCell: RNNCell, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def _convert_one(m: nn.Module) -> nn.Module:
    new = _build_like(m)
    new.load_state_dict(m.state_dict())
    for (_, p_new), (_, p_old) in zip(new.named_parameters(), m.named_parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    new.train(m.training)
    return new


def _build_like(m: nn.Module) -> nn.Module:
    cls = _REPLACEMENTS[type(m)]
    if isinstance(m, nn.RNNCellBase):
        w = m.weight_ih
        kw = dict(bias=m.bias, device=w.device, dtype=w.dtype)
        if isinstance(m, nn.RNNCell):
            kw["nonlinearity"] = m.nonlinearity
        return cls(m.input_size, m.hidden_size, **kw)
    w = m.weight_ih_l0
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
              dropout=m.dropout, bidirectional=m.bidirectional, device=w.device, dtype=w.dtype)
    if isinstance(m, nn.RNN):
        kw["nonlinearity"] = m.nonlinearity
    if isinstance(m, nn.LSTM):
        kw["proj_size"] = m.proj_size
    return cls(m.input_size, m.hidden_size, **kw)


def convert(module: nn.Module) -> nn.Module:
    """Replace every torch.nn.RNN, LSTM, GRU and their cells inside ``module`` (in place) by its pyrnn
    equivalent with the same weights, device, dtype and training mode. Returns the module
    (a bare torch.nn.LSTM passed in directly is returned converted)."""
    if type(module) in _REPLACEMENTS:
        return _convert_one(module)
    for name, child in list(module.named_children()):
        if type(child) in _REPLACEMENTS:
            setattr(module, name, _convert_one(child))
        else:
            convert(child)
    return module
