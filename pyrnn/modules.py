"""Drop-in replacements for torch.nn.RNN, LSTM and GRU, running on pyrnn's fused ops.

The classes derive from torch.nn.RNNBase, so constructor arguments, parameter names,
shapes, initialisation and state_dict layout are torch.nn's own; only forward differs.
(They derive from RNNBase rather than from torch.nn.LSTM etc. so that torch.compile
traces them instead of breaking the graph.)
"""
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import _C
from . import export as _export
from . import ops


def _leaky_slope(nonlinearity, negative_slope):
    """The negative slope of an Elman module or cell: its registry default when None, checked
    (a finite number >= 0); None for a nonlinearity other than leaky_relu, which takes none."""
    if nonlinearity != "leaky_relu":
        if negative_slope is not None:
            raise ValueError(f"negative_slope: only nonlinearity='leaky_relu' takes one, got "
                             f"negative_slope={negative_slope!r} with nonlinearity="
                             f"'{nonlinearity}'")
        return None
    if negative_slope is None:
        return ops.CELLS["rnn_leaky_relu"]["params"]["negative_slope"]
    value = negative_slope
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value < float("inf")):
        raise ValueError(f"negative_slope: expected a finite number >= 0, got {value!r}")
    return float(value)


def _constants(module, mode) -> list:
    """The constants of cell ``mode`` (the registry's order): the module's attributes of
    the constants' names."""
    return [getattr(module, name) for name in ops.CELLS[mode]["params"]]


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
    return _padded(seq.data, rows, T, B), lengths, rows


def _padded(data: Tensor, rows: Tensor, T: int, B: int) -> Tensor:
    """[T, B, *] zeros with the packed rows data [N, *] at rows (as _unpack gives them)."""
    return data.new_zeros(T * B, data.shape[1]).index_copy(0, rows, data).view(T, B, -1)


# Dtypes that the modules accept and run in float32, returning results in their own dtype.
_UPCAST = (torch.float16, torch.bfloat16)


def _autocast_dtypes(cell: str, x: Tensor, h0, c0, proj: bool = False, onednn: bool = False):
    """The dtypes of the results torch.nn returns under autocast: (output and h, c). On the
    CPU torch.nn runs its products in the autocast dtype and its pointwise steps in the
    dtype that the product and the previous state promote to, so the state keeps the
    wider of the two: an Elman state is the activation of a product alone (the autocast
    dtype); a GRU state and an LSTM cell state mix in the previous one (float32 unless
    the initial state, or else the input, is in the lower dtype), and an LSTM's h follows
    its cell state unless a projection (a product) makes it. torch.nn's LSTM on oneDNN
    (onednn: a module's unpacked input without a projection, where oneDNN takes the
    input's dtype) returns all three in the autocast dtype. h0, c0: the given initial
    states (or None). The cells pyrnn adds, and every cell on CUDA: float32 (the kernels'
    dtype under autocast)."""
    if x.device.type != "cpu" or cell not in _export.TORCH_NN_CELLS:
        return torch.float32, torch.float32
    low = torch.get_autocast_dtype("cpu")
    if cell.startswith("rnn_"):
        return low, None
    h_prev = torch.promote_types(low, (h0 if h0 is not None else x).dtype)
    if cell == "gru":
        return h_prev, None
    c = torch.promote_types(low, (c0 if c0 is not None else x).dtype)
    if proj:
        return low, c
    if onednn and _onednn_lstm(x):
        return low, low
    return c, c


def _weight_dtype(x: Tensor, w: Tensor, autocast: bool, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the weights the ops get, the kernels running in dtype: bfloat16 on the
    CPU under bfloat16 autocast or for a bfloat16 module, where the products take their
    operands in bfloat16 and sum in float32, as torch.nn's (see README, Precision)."""
    if x.device.type != "cpu" or dtype != torch.float32:
        return dtype
    low = torch.get_autocast_dtype("cpu") if autocast else w.dtype
    return torch.bfloat16 if low == torch.bfloat16 else dtype


def _onednn_lstm(x: Tensor) -> bool:
    """Whether torch.nn.LSTM runs this input on oneDNN (ATen's use_mkldnn)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if x.numel() == 0:
        return False
    if x.dtype == torch.float32:
        return True
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if x.dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            0 < eps < float("inf")):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    return float(eps)


def _type_name(t: Tensor) -> str:
    """ATen's name of a tensor's dtype (Float, Double, ...), as in ATen's own messages."""
    return t.new_empty(0, device="cpu").type().rsplit(".", 1)[-1].replace("Tensor", "")


def _check_clip(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"bptt_clip: expected a number >= 0 (0 = off), got {value!r}")
    return float(value)


def _permute(hx, permutation):
    if permutation is None:
        return hx
    if isinstance(hx, (tuple, list)):
        return tuple(h.index_select(1, permutation) for h in hx)
    return hx.index_select(1, permutation)


def _check_packed(seq: PackedSequence) -> None:
    """A PackedSequence built by hand can be malformed; torch.nn then returns garbage or
    fails deep inside. Raise a clear error instead."""
    bs, data = seq.batch_sizes, seq.data
    if not isinstance(bs, Tensor) or bs.dim() != 1 or bs.dtype != torch.int64:
        raise RuntimeError("input (PackedSequence): batch_sizes must be a 1-D int64 tensor, got "
                           f"{bs.dtype if isinstance(bs, Tensor) else type(bs).__name__} of "
                           f"shape {tuple(bs.shape) if isinstance(bs, Tensor) else ()}")
    if bs.device.type != "cpu":
        raise RuntimeError(f"input (PackedSequence): batch_sizes must be on the CPU, got {bs.device}")
    if bs.numel() == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if bool((bs <= 0).any()):
        raise RuntimeError(f"input (PackedSequence): batch_sizes must be positive, got {bs.tolist()}")
    if bool((bs[1:] > bs[:-1]).any()):
        raise RuntimeError("input (PackedSequence): batch_sizes must be non-increasing (sequences "
                           f"sorted by decreasing length), got {bs.tolist()}")
    if data.dim() >= 1 and int(bs.sum()) != data.shape[0]:
        raise RuntimeError(f"input (PackedSequence): batch_sizes sum to {int(bs.sum())} but data "
                           f"has {data.shape[0]} rows")
    for name in ("sorted_indices", "unsorted_indices"):
        idx = getattr(seq, name)
        if idx is not None and tuple(idx.shape) != (int(bs[0]),):
            raise RuntimeError(f"input (PackedSequence): {name} must have shape "
                               f"({int(bs[0])},) (the batch size), got {tuple(idx.shape)}")


def _may_compile(input) -> bool:
    """Whether a module call or cell step with this input may try the compiled forward of
    a plain call (csrc/autograd.cpp): a plain tensor input, and no forward AD tangent
    level, torch.func transform, tracing or compiling, which need the Python forward."""
    return (type(input) is Tensor and _fwad._current_level < 0
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._get_tracing_state() and not torch.compiler.is_compiling())


class _Base(nn.RNNBase):
    """Shared forward of pyrnn.RNN, LSTM and GRU."""

    def __init__(self, mode, *args, bptt_clip: float = 0.0, record_grad_norms: bool = False,
                 record_gate_stats: bool = False, vanishing_penalty: float = 0.0, **kwargs):
        super().__init__(mode, *args, **kwargs)
        self.bptt_clip = bptt_clip
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

    @property
    def bptt_clip(self) -> float:
        """Clamp for the gate pre-activation gradients inside BPTT ([-c, c]; 0 = off)."""
        return self._bptt_clip

    @bptt_clip.setter
    def bptt_clip(self, value) -> None:
        self._bptt_clip = _check_clip(value)

    def flatten_parameters(self) -> None:
        """No-op: pyrnn's kernels read the parameters where they are."""

    def __prepare_scriptable__(self):
        return _script_twin(self)

    @staticmethod
    def _own_state() -> dict:
        """The attributes of pyrnn's own settings and records, as a new module has them."""
        return {"_bptt_clip": 0.0, "vanishing_penalty": 0.0, "_vanishing_omega": None,
                "_ratio_store": None, "record_grad_norms": False, "_norm_shape": None,
                "record_gate_stats": False, "_gate_stats": None, "_gate_order": None,
                "_norm_order": None, "_grad_norm_store": torch.zeros(0)}

    def __setstate__(self, state):
        super().__setstate__(state)
        if "bptt_clip" in self.__dict__:
            self.__dict__["_bptt_clip"] = self.__dict__.pop("bptt_clip")
        _fit_state(self.__dict__, type(self))

    @property
    def _cell_mode(self) -> str:
        """The name of the module's cell in the registry (pyrnn.ops.CELLS)."""
        return "rnn_" + self.nonlinearity if self.mode.startswith("RNN") else self.mode.lower()

    def _cell_params(self) -> list:
        """The cell's constants, in the registry's order."""
        return _constants(self, self._cell_mode)

    def _cell_weight(self, layer, direction) -> Optional[Tensor]:
        """The cell's own weights (a layer-normalised cell), else None."""
        return None

    def _check_penalty(self):
        if self.vanishing_penalty and not ops.CELLS[self._cell_mode]["elman"]:
            raise ValueError(f"vanishing_penalty: the vanishing-gradient regulariser is defined "
                             f"for the Elman RNN (tanh, relu, leaky_relu) only, got "
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
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of one layer and direction,
        as getattr finds them (a parametrization or torch.func.functional_call may stand
        in for a parameter); a registered parameter is read from _parameters directly,
        which is what getattr would find, at a fraction of the cost."""
        names = self._flat_weights_names  # torch.nn's: per layer and direction, in order
        D = 2 if self.bidirectional else 1
        per = len(names) // (self.num_layers * D)
        k = (layer * D + direction) * per
        w = [self._param(names[k]), self._param(names[k + 1]), None, None, None]
        if self.bias:
            w[2], w[3] = self._param(names[k + 2]), self._param(names[k + 3])
        if self.proj_size > 0:
            w[4] = self._param(names[k + per - 1])
        return w

    # The checks below follow torch.nn's own, in its order, with its exception types and
    # messages (torch/nn/modules/rnn.py and ATen's RNN.cpp), so that code written against
    # torch.nn sees the same errors; pyrnn adds detail after torch.nn's wording only.

    def _param(self, name):
        """The parameter ``name`` as getattr finds it (see _weights)."""
        params = self._parameters
        return params[name] if name in params else getattr(self, name)

    def _check_input(self, input: Tensor, batch_sizes) -> None:
        w = self._param("weight_ih_l0")
        if input.dtype != w.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")

    def _expected_hidden(self, input: Tensor, batch_sizes, size: int):
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = input.size(0) if self.batch_first else input.size(1)
        return (self.num_layers * (2 if self.bidirectional else 1), batch, size)

    def _check_forward_args(self, input: Tensor, hx, batch_sizes) -> None:
        self._check_input(input, batch_sizes)
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        if self.mode == "LSTM":
            checks = [(hx[0], P, "Expected hidden[0] size {}, got {}"),
                      (hx[1], self.hidden_size, "Expected hidden[1] size {}, got {}")]
        else:
            checks = [(hx, self.hidden_size, "Expected hidden size {}, got {}")]
        for h, size, msg in checks:
            expected = self._expected_hidden(input, batch_sizes, size)
            if h.size() != expected:
                raise RuntimeError(msg.format(expected, list(h.size())))

    def _check_attributes(self, input: Tensor, states, packed: bool) -> None:
        """ATen's checks that torch.nn runs inside its kernels: devices, hidden dtypes and a
        non-empty sequence."""
        device = input.device
        for name, tensors in (("hidden", states), ("parameter", self._flat_weights)):
            for t in tensors:
                if t is not None and t.device != device:
                    raise RuntimeError(
                        f"Input and {name} tensors are not at the same device, found input "
                        f"tensor at {device} and {name} tensor at {t.device}")
        w = self._param("weight_hh_l0")
        for k, h in enumerate(states):
            if h.dtype != w.dtype and not torch._C._is_any_autocast_enabled():
                # Off oneDNN, torch.nn's LSTM adds c_{t-1} into c_t in the dtype of both: a
                # cell state that promotes to the parameters' dtype runs (in that dtype).
                if k == 1 and torch.promote_types(w.dtype, h.dtype) == w.dtype and (
                        self.proj_size > 0 or packed or not _onednn_lstm(input)):
                    continue
                raise RuntimeError(
                    f"mat1 and mat2 must have the same dtype, but got {_type_name(h)} and "
                    f"{_type_name(w)} (hx: expected the parameters' dtype {w.dtype}, got {h.dtype})")

    def _prepare(self, input, hx):
        """torch.nn's forward preamble: (input as [T, B, I] or packed data, batch_sizes,
        sorted and unsorted indices, whether batched, hx as a list of [L*D, B, *] states
        or None), after torch.nn's checks."""
        is_lstm = self.mode == "LSTM"
        name = "RNN" if self.mode.startswith("RNN") else self.mode
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_idx, unsorted_idx = input
            _check_packed(input)
            if hx is not None:
                hx = _permute(hx, sorted_idx)
            states = None if hx is None else (list(hx) if is_lstm else [hx])
            if states is not None:
                self._check_forward_args(data, states if is_lstm else states[0], batch_sizes)
            else:
                self._check_input(data, batch_sizes)
            return data, batch_sizes, sorted_idx, unsorted_idx, True, states
        if input.dim() not in (2, 3):
            tail = " tensor instead" if name == "RNN" else " instead"
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tail}")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        if hx is not None:
            if is_lstm:
                want = 3 if batched else 2
                if hx[0].dim() != want or hx[1].dim() != want:
                    form = "batched 3-D" if batched else "unbatched 2-D"
                    raise RuntimeError(
                        f"For {form} input, hx and cx should also be {want}-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                # torch.nn passes a batched hx on to ATen's lstm, which takes exactly two
                # tensors (after the size checks below); an unbatched one is rebuilt
                two = not batched or len(hx) == 2
                hx = (hx[0], hx[1]) if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            else:
                if not batched and hx.dim() != 2:
                    raise RuntimeError("For unbatched 2-D input, hx should also be 2-D but got "
                                       f"{hx.dim()}-D tensor")
                if batched and hx.dim() != 3:
                    raise RuntimeError("For batched 3-D input, hx should also be 3-D but got "
                                       f"{hx.dim()}-D tensor")
                hx = hx if batched else hx.unsqueeze(1)
            self._check_forward_args(input, hx, None)
            if is_lstm and not two:
                raise RuntimeError("lstm expects two hidden states")
        else:
            self._check_input(input, None)
        states = None if hx is None else (list(hx) if is_lstm else [hx])
        x = input.transpose(0, 1) if self.batch_first else input
        return x, None, None, None, batched, states

    # Whether forward may first try the compiled forward of a plain call (csrc/autograd.cpp),
    # which passes the cells no weights of their own (LayerNormLSTM sets it False).
    _compiled_forward = True

    def forward(self, input, hx=None):
        if (self._compiled_forward and not self.record_grad_norms
                and not self.record_gate_stats and not self.vanishing_penalty
                and (not self.dropout or not self.training or self.num_layers == 1)
                and _may_compile(input)):
            # A plain call (csrc/autograd.cpp says which) runs there; any other, None.
            mode = self._cell_mode
            result = _C.module_forward(
                mode, input, hx, self._parameters, self._flat_weights_names, self.num_layers,
                self.bidirectional, self.batch_first, self.input_size, self.hidden_size,
                self.proj_size, bool(self.bias), self.mode == "LSTM", self._bptt_clip,
                _constants(self, mode))
            if result is not None:
                return result
        if _export.exporting():
            return _export.module_forward(self, input, hx)
        mode = self._cell_mode
        is_lstm = ops.CELLS[mode]["has_cell"]
        packed = isinstance(input, PackedSequence)
        x, batch_sizes, sorted_idx, unsorted_idx, batched, states = self._prepare(input, hx)
        self._check_attributes(x, states or [], packed)
        lengths = rows = None
        if packed:
            # Padded [T, B, I] in the packed (sorted) order, as torch.nn runs it: one
            # scatter of the packed rows, and one gather back for the output.
            x, lengths, rows = _unpack(input)
        T, B = x.shape[0], x.shape[1]
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        D = 2 if self.bidirectional else 1
        LD = self.num_layers * D
        H = self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H  # width of h

        out_dtype = c_dtype = dtype = x.dtype
        autocast = torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(
            x.device.type)
        if autocast:
            # The fused kernels run in float32 under autocast, with bfloat16 products on
            # the CPU under bfloat16 autocast (_weight_dtype; README, "Precision"), and
            # return, on the CPU, what torch.nn returns.
            dtype = torch.float32
            out_dtype, c_dtype = _autocast_dtypes(
                mode, x, states[0] if states else None, states[1] if states and is_lstm else None,
                proj=self.proj_size > 0, onednn=not packed)
        elif dtype in _UPCAST:
            # float16 and bfloat16 run in float32 and return in their own dtype.
            dtype = torch.float32
        wdtype = _weight_dtype(x, self._flat_weights[0], autocast, dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        if states is None:  # zeros, one tensor for every layer (the ops only read it)
            h0 = [x.new_zeros(B, P)] * LD
            c0 = None if not is_lstm else h0 if P == H else [x.new_zeros(B, H)] * LD
        else:
            h0 = states[0] if states[0].dtype == dtype else states[0].to(dtype)
            c0 = None if not is_lstm else states[1] if states[1].dtype == dtype else \
                states[1].to(dtype)

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
        cell_params = _constants(self, mode)
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = (
                    w if w is None or w.dtype == want else w.to(want)
                    for w, want in zip(self._weights(layer, d),
                                       (wdtype, wdtype, dtype, dtype, wdtype)))
                cw = self._cell_weight(layer, d)
                cw = None if cw is None else cw.to(dtype)
                out, h, c = ops.layer(
                    mode, layer_input, h0[k], c0[k] if is_lstm else None, w_ih, w_hh, b_ih,
                    b_hh, lengths, d == 1, self.bptt_clip, None if store is None else store[k],
                    w_hr, None if stats is None else stats[k],
                    vanishing_penalty=self.vanishing_penalty if omega is not None else 0.0,
                    ratio_out=None if ratios is None else ratios[k],
                    omega_out=None if omega is None else omega[k:k + 1],
                    cell_params=cell_params, cell_weight=cw)
                outs.append(out)
                h_n.append(h)
                if is_lstm:
                    c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                if packed:  # torch.nn draws the mask over the packed rows, in their order
                    data = layer_input.reshape(T * B, -1).index_select(0, rows)
                    layer_input = _padded(torch.dropout(data, self.dropout, True), rows, T, B)
                else:
                    layer_input = torch.dropout(layer_input, self.dropout, True)
        output = layer_input
        h_n = h_n[0].unsqueeze(0) if LD == 1 else torch.stack(h_n)
        c_n = None if not is_lstm else c_n[0].unsqueeze(0) if LD == 1 else torch.stack(c_n)

        if out_dtype != dtype:
            output, h_n = output.to(out_dtype), h_n.to(out_dtype)
        if c_n is not None and c_dtype != dtype:
            c_n = c_n.to(c_dtype)
        if packed:
            data = output.reshape(T * B, output.shape[2]).index_select(0, rows)
            output = PackedSequence(data, batch_sizes, sorted_idx, unsorted_idx)
            if unsorted_idx is not None:
                h_n = h_n.index_select(1, unsorted_idx)
                c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None
        elif not batched:
            output = output.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if is_lstm else h_n)


class RNN(_Base):
    """Elman RNN, a drop-in for torch.nn.RNN (same arguments, parameters and results).

    Beyond torch.nn: nonlinearity="leaky_relu" (h = a if a > 0 else negative_slope * a,
    as torch.nn.functional.leaky_relu; negative_slope, default 0.01, a finite number >= 0;
    such a module has mode "RNN_LEAKY_RELU" and no torch.nn counterpart).
    Extra keyword arguments: bptt_clip (clamp gate pre-activation gradients inside BPTT
    to [-c, c]; 0 = off), record_grad_norms (see grad_norms), record_gate_stats (see
    gate_stats) and vanishing_penalty (the vanishing-gradient regulariser of Pascanu et al.
    2013, see pyrnn.ops.rnn_tanh; Omega per layer in vanishing_omega; Elman cells only).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 negative_slope=None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if nonlinearity not in ("tanh", "relu", "leaky_relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             "'relu'. (pyrnn also takes 'leaky_relu'.)")
        slope = _leaky_slope(nonlinearity, negative_slope)
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, **kwargs)
        if slope is not None:
            self.mode = "RNN_LEAKY_RELU"
            self.negative_slope = slope

    def extra_repr(self) -> str:
        s = super().extra_repr()  # torch.nn's, which does not name the nonlinearity
        if self.nonlinearity == "leaky_relu":
            s += f", nonlinearity='leaky_relu', negative_slope={self.negative_slope}"
        return s


class LSTM(_Base):
    """LSTM, a drop-in for torch.nn.LSTM. Extra keywords as for pyrnn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 **kwargs):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, device=device, dtype=dtype, **kwargs)


class LayerNormLSTM(_Base):
    """LayerNorm-LSTM (Ba, Kiros and Hinton 2016), gates i, f, g, o as torch.nn.LSTM:

        a   = LN(W_ih x_t) * ln_gain_ih + b_ih + LN(W_hh h_{t-1}) * ln_gain_hh + b_hh
        c_t = sigmoid(a_f) * c_{t-1} + sigmoid(a_i) * tanh(a_g)
        h_t = sigmoid(a_o) * tanh(LN(c_t) * ln_gain_c + ln_bias_c)

    LN normalises over the whole vector (4 * hidden_size entries for a, hidden_size for
    c_t) as torch.nn.functional.layer_norm does (biased variance, eps added to it). The
    arguments, the weights and biases (weight_ih_l0, ...), the states (h, c) and the
    results are torch.nn.LSTM's (without proj_size); each layer and direction adds the
    gains ln_gain_ih{sfx} and ln_gain_hh{sfx} [4 * hidden_size] (initialised to 1),
    ln_gain_c{sfx} [hidden_size] (1) and ln_bias_c{sfx} [hidden_size] (0). eps: the layer
    norms' epsilon. Extra keywords as for pyrnn.RNN (but vanishing_penalty, which is for
    the Elman cells). No torch.nn counterpart: convert and to_torch leave it as it is.
    """

    _LN_NAMES = ("ln_gain_ih", "ln_gain_hh", "ln_gain_c", "ln_bias_c")

    _compiled_forward = False  # its cell weights travel through the Python forward

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, eps=1e-5, device=None, dtype=None, **kwargs):
        if kwargs.get("proj_size", 0):
            raise ValueError("proj_size: LayerNormLSTM takes no projection, got "
                             f"proj_size={kwargs['proj_size']}")
        kwargs.pop("proj_size", None)
        eps = _check_eps(eps)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device=device, dtype=dtype, **kwargs)
        self.eps = eps
        H = hidden_size
        factory = dict(device=device, dtype=dtype)
        for layer in range(num_layers):
            for d in range(2 if bidirectional else 1):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                for name, n in zip(self._LN_NAMES, (4 * H, 4 * H, H, H)):
                    self.register_parameter(name + sfx, nn.Parameter(torch.empty(n, **factory)))
        self._reset_norms()

    def _reset_norms(self):
        """The layer norms' gains to 1 and biases to 0 (the cell's too, LayerNormLSTMCell)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.fill_(0.0 if name.startswith("ln_bias") else 1.0)

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's initialisation of the weights and biases; gains 1, ln_bias_c 0."""
        super().reset_parameters()
        if hasattr(self, "eps"):  # after __init__ (RNNBase's calls this before the norms exist)
            self._reset_norms()

    @property
    def _cell_mode(self) -> str:
        return "ln_lstm"

    def _cell_weight(self, layer, direction) -> Tensor:
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        return torch.cat([getattr(self, name + sfx) for name in self._LN_NAMES])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class GRU(_Base):
    """GRU (PyTorch's variant), a drop-in for torch.nn.GRU. Extra keywords as for pyrnn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype, **kwargs)


_CELL_WEIGHTS = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]  # torch.nn's cells' names


class _CellMixin:
    """One fused step of the cell: the layer op with T = 1 (the same kernels and cell math).
    The checks are torch.nn's (the module's, then those ATen runs inside its cell kernels),
    with the same exception types and messages."""

    _mode = None
    _name = None

    def _cell_params(self) -> list:
        return _constants(self, self._mode)

    def __prepare_scriptable__(self):
        return _script_twin(self)

    def _cell_weight(self) -> Optional[Tensor]:
        """The cell's own weights (a layer-normalised cell), else None."""
        return None

    # Whether a step may first try the modules' compiled forward of a plain call
    # (csrc/autograd.cpp) as a one-step layer (LayerNormLSTMCell sets it False).
    _compiled_forward = True

    def _step(self, input, hx):
        """input [B, I] or [I]; hx None, a tensor, or (h, c) for the LSTM cell."""
        is_lstm = ops.CELLS[self._mode]["has_cell"]
        # The step as a layer of one step ([1, B, I], states [1, B, H]; unbatched [1, I] and
        # [1, H]) when hx is None or plain tensors (the LSTM cell's an exact pair).
        plain_hx = hx is None or (
            (type(hx) is tuple and len(hx) == 2 and type(hx[0]) is Tensor
             and type(hx[1]) is Tensor) if is_lstm else type(hx) is Tensor)
        if self._compiled_forward and plain_hx and _may_compile(input):
            states = (None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
                      if is_lstm else hx.unsqueeze(0))
            result = _C.module_forward(
                self._mode, input.unsqueeze(0), states, self._parameters,
                _CELL_WEIGHTS if self.bias else _CELL_WEIGHTS[:2], 1, False, False,
                self.input_size, self.hidden_size, 0, bool(self.bias), is_lstm, 0.0,
                self._cell_params())
            if result is not None:
                h_n = result[1]  # [1, B, H] each
                return (h_n[0][0], h_n[1][0]) if is_lstm else (h_n[0], None)
        if _export.exporting():
            return _export.cell_step(self, input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got "
                             f"{input.dim()}D instead")
        if hx is not None:
            for idx, h in enumerate(hx if is_lstm else [hx]):
                if h.dim() not in (1, 2):
                    what = f"hx[{idx}]" if is_lstm else "hidden"
                    raise ValueError(f"{self._name}: Expected {what} to be 1D or 2D, got "
                                     f"{h.dim()}D instead")
        batched = input.dim() == 2
        if is_lstm and hx is not None:
            # torch.nn passes a batched hx on to ATen's lstm_cell as it is, which takes
            # exactly two tensors (before any size check); an unbatched one is rebuilt
            # from its first two
            if not batched:
                hx = (hx[0], hx[1])
            elif not isinstance(hx, (tuple, list)):
                raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of "
                                f"Tensors, not {type(hx).__name__}")
            elif len(hx) != 2:
                raise RuntimeError("lstm_cell expects two hidden states")
        x = input if batched else input.unsqueeze(0)
        B, H = x.shape[0], self.hidden_size
        if hx is None:
            zeros = torch.zeros(B, H, dtype=x.dtype, device=x.device)
            states = [zeros, zeros] if is_lstm else [zeros]
        else:
            states = [h if batched else h.unsqueeze(0) for h in (hx if is_lstm else [hx])]
        if x.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.size(1)} expected "
                               f"{self.input_size}")
        for k, h in enumerate(states):
            if x.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {x.size(0)} doesn't match hidden{k} "
                                   f"batch size {h.size(0)}")
            if h.size(1) != H:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {h.size(1)}, "
                                   f"expected {H}")
        params = [p for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
                  if p is not None]
        for t in [x] + states + params:
            if t.device != self.weight_ih.device:
                raise RuntimeError(f"Tensor on device {self.weight_ih.device} is not on the "
                                   f"expected device {t.device}!")
        w = self.weight_ih
        autocast = torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(
            x.device.type)
        if not autocast:
            for t in [x] + states[:1]:
                if t.dtype != w.dtype:
                    raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got "
                                       f"{_type_name(t)} and {_type_name(w)}")
        out_dtype = c_dtype = dtype = x.dtype
        if autocast:  # torch.nn's cells run on no oneDNN kernel
            dtype = torch.float32
            given = states if hx is not None else [None, None]
            out_dtype, c_dtype = _autocast_dtypes(self._mode, x, given[0], given[-1])
        elif dtype in _UPCAST:
            dtype = torch.float32  # float16 and bfloat16 run in float32
        if is_lstm and hx is not None and not autocast:
            # torch.nn's cell adds c_{t-1} into c_t in the dtype of both: a float64 c with
            # a float32 cell gives float64 h and c
            out_dtype = c_dtype = torch.promote_types(x.dtype, states[1].dtype)
        wdtype = _weight_dtype(x, w, autocast, dtype)
        h0 = states[0].to(dtype)
        c0 = states[1].to(dtype) if is_lstm else None
        b_ih = self.bias_ih.to(dtype) if self.bias else None
        b_hh = self.bias_hh.to(dtype) if self.bias else None
        cw = self._cell_weight()
        _, h, c = ops.layer(self._mode, x.to(dtype).unsqueeze(0), h0, c0,
                            self.weight_ih.to(wdtype), self.weight_hh.to(wdtype), b_ih, b_hh,
                            cell_params=self._cell_params(),
                            cell_weight=None if cw is None else cw.to(dtype))
        h = h.to(out_dtype) if batched else h.squeeze(0).to(out_dtype)
        if c is not None:
            c = c.to(c_dtype) if batched else c.squeeze(0).to(c_dtype)
        return h, c


class RNNCell(_CellMixin, nn.RNNCell):
    """Elman RNN cell, a drop-in for torch.nn.RNNCell. Beyond torch.nn:
    nonlinearity="leaky_relu" with negative_slope (default 0.01), as pyrnn.RNN."""

    _name = "RNNCell"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
                 dtype=None, negative_slope=None):
        slope = _leaky_slope(nonlinearity, negative_slope)
        super().__init__(input_size, hidden_size, bias, nonlinearity, device=device, dtype=dtype)
        if slope is not None:
            self.negative_slope = slope

    @property
    def _mode(self):
        return "rnn_" + self.nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.nonlinearity == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s

    def forward(self, input, hx=None):
        if self.nonlinearity not in ("tanh", "relu", "leaky_relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return self._step(input, hx)[0]


class LSTMCell(_CellMixin, nn.LSTMCell):
    """LSTM cell, a drop-in for torch.nn.LSTMCell."""

    _mode = "lstm"
    _name = "LSTMCell"

    def forward(self, input, hx=None):
        return self._step(input, hx)


class GRUCell(_CellMixin, nn.GRUCell):
    """GRU cell, a drop-in for torch.nn.GRUCell."""

    _mode = "gru"
    _name = "GRUCell"

    def forward(self, input, hx=None):
        return self._step(input, hx)[0]


class LayerNormLSTMCell(_CellMixin, nn.LSTMCell):
    """One step of pyrnn.LayerNormLSTM (the same formulation and kernels): torch.nn.LSTMCell's
    arguments, weights, states and results, plus the gains ln_gain_ih and ln_gain_hh
    [4 * hidden_size] (initialised to 1), ln_gain_c [hidden_size] (1) and ln_bias_c
    [hidden_size] (0), and eps, the layer norms' epsilon. No torch.nn counterpart."""

    _mode = "ln_lstm"
    _name = "LayerNormLSTMCell"
    _LN_NAMES = LayerNormLSTM._LN_NAMES

    _compiled_forward = False  # its cell weights go through the Python step

    def __init__(self, input_size, hidden_size, bias=True, eps=1e-5, device=None, dtype=None):
        eps = _check_eps(eps)
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.eps = eps
        H = hidden_size
        for name, n in zip(self._LN_NAMES, (4 * H, 4 * H, H, H)):
            self.register_parameter(name, nn.Parameter(torch.empty(n, device=device,
                                                                   dtype=dtype)))
        self._reset_norms()

    _reset_norms = LayerNormLSTM._reset_norms

    def reset_parameters(self) -> None:
        """torch.nn.LSTMCell's initialisation of the weights and biases; gains 1,
        ln_bias_c 0."""
        super().reset_parameters()
        if hasattr(self, "eps"):  # after __init__ (torch.nn's calls this first)
            self._reset_norms()

    def _cell_weight(self) -> Tensor:
        return torch.cat([getattr(self, name) for name in self._LN_NAMES])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"

    def forward(self, input, hx=None):
        return self._step(input, hx)


_REPLACEMENTS = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU,
                 nn.RNNCell: RNNCell, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}
_TORCH_NN = {ours: theirs for theirs, ours in _REPLACEMENTS.items()}


def _check_twin(m: nn.Module) -> None:
    if getattr(m, "nonlinearity", None) == "leaky_relu":
        raise ValueError(f"{type(m).__name__} with nonlinearity='leaky_relu' has no torch.nn "
                         "counterpart (torch.nn's RNN takes 'tanh' or 'relu')")


def _script_twin(m: nn.Module) -> nn.Module:
    """What torch.jit.script compiles for a pyrnn module or cell (__prepare_scriptable__):
    TorchScript cannot compile pyrnn's forward, so it takes torch.nn's twin of m, which
    holds m's state (the same parameters, hooks and attributes) under torch.nn's class, and
    whose forward is torch.nn's own (as while exporting)."""
    cls = _TORCH_NN.get(type(m))
    if cls is None or getattr(m, "nonlinearity", None) == "leaky_relu":
        raise NotImplementedError(
            f"torch.jit.script: {type(m).__name__} has no torch.nn counterpart to compile"
            + (" (nonlinearity='leaky_relu')" if cls is not None else "")
            + "; torch.export and torch.compile take it")
    twin = cls.__new__(cls)
    twin.__dict__.update(m.__dict__)
    _fit_state(twin.__dict__, cls)
    return twin


def _fit_state(state: dict, cls) -> None:
    """A module's attributes (its __dict__) made those of a cls module: pyrnn's own
    settings and records at their defaults for a pyrnn module, none for torch.nn's."""
    own = _Base._own_state()
    for k, v in own.items():
        if issubclass(cls, _Base):
            state.setdefault(k, v)
        else:
            state.pop(k, None)


def _rebuild(m: nn.Module, cls) -> nn.Module:
    """A cls module with m's arguments, weights, device, dtype, requires_grad and training
    mode (m and cls: a torch.nn recurrent module or cell and its pyrnn twin, either way)."""
    _check_twin(m)
    if isinstance(m, nn.RNNCellBase):
        w = m.weight_ih
        kw = dict(bias=m.bias, device=w.device, dtype=w.dtype)
        if isinstance(m, nn.RNNCell):
            kw["nonlinearity"] = m.nonlinearity
    else:
        w = m.weight_ih_l0
        kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                  dropout=m.dropout, bidirectional=m.bidirectional, device=w.device,
                  dtype=w.dtype)
        if m.mode.startswith("RNN"):
            kw["nonlinearity"] = m.nonlinearity
        if m.mode == "LSTM":
            kw["proj_size"] = m.proj_size
    new = cls(m.input_size, m.hidden_size, **kw)
    new.load_state_dict(m.state_dict())
    for (_, p_new), (_, p_old) in zip(new.named_parameters(), m.named_parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    new.train(m.training)
    return new


def _twin_class(m: nn.Module, classes: dict):
    """The class that _swap gives m, or None: classes[type(m)], or for a module that
    torch.nn.utils.parametrize parametrizes (its class then a class of its own over the
    module's, which holds the parametrized tensors' properties) a class of that kind over
    the twin."""
    t = type(m)
    if t in classes:
        return classes[t]
    base = t.__bases__[0] if len(t.__bases__) == 1 else None
    if base not in classes or t.__name__ != f"Parametrized{base.__name__}" or \
            not parametrize.is_parametrized(m):
        return None
    twin = classes[base]
    own = {k: v for k, v in vars(t).items() if k not in ("__dict__", "__weakref__")}
    return type(f"Parametrized{twin.__name__}", (twin,), own)


def _swap(module: nn.Module, classes: dict) -> nn.Module:
    """Make every submodule whose type is a key of classes a module of the value's type, in
    place: the same object, with its parameters (which an optimizer may hold), hooks,
    attributes and every place it has in the model (a module held twice stays one). The
    two classes of a pair keep the same attributes (pyrnn's have their own settings on
    top, set to their defaults here, or dropped on the way back). A bare module of such a
    type is returned rebuilt, a new module: the one passed in is left as it was."""
    if type(module) in classes:
        return _rebuild(module, classes[type(module)])
    found = [(m, _twin_class(m, classes)) for m in module.modules()]
    found = [(m, cls) for m, cls in found if cls is not None]
    for m, _ in found:
        _check_twin(m)
    for m, cls in found:
        m.__class__ = cls
        _fit_state(m.__dict__, cls)
    return module


def convert(module: nn.Module) -> nn.Module:
    """Make every torch.nn.RNN, LSTM, GRU and cell inside ``module`` its pyrnn equivalent, in
    place: each stays the same object, with the same parameters (an optimizer built
    before keeps training them), hooks, attributes and parametrizations. Returns the
    module. A bare torch.nn.LSTM passed in directly (without parametrizations) is returned
    as a new pyrnn module with the same weights, device, dtype, requires_grad and training
    mode, and is itself left as it was. Subclasses of torch.nn's modules are left as they
    are."""
    return _swap(module, _REPLACEMENTS)


def to_torch(module: nn.Module) -> nn.Module:
    """The inverse of convert: make every pyrnn.RNN, LSTM, GRU and cell inside ``module``
    its torch.nn equivalent in place, the same objects with the same parameters (a bare
    pyrnn module passed in directly is returned as a new torch.nn module). pyrnn's own
    settings (bptt_clip, record_grad_norms, record_gate_stats, vanishing_penalty) have no
    torch.nn counterpart and are dropped."""
    return _swap(module, _TORCH_NN)
