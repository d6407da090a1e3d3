"""ONNX export of pyrnn modules.

While ``torch.onnx.export`` runs (either exporter), pyrnn's modules run torch.nn's own
forward on their own parameters, so the exporters see exactly what they see for torch.nn's
modules: ONNX's RNN, LSTM and GRU operators where the exporter writes them for torch.nn, and
the same decomposition where it decomposes (the cells, and the Elman RNN under the dynamo
exporter). Outside an export nothing here runs.
"""

import torch
from torch import Tensor, nn

_TORCH_CLASS = {"RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}
# The cells of the registry that torch.nn has (pyrnn.ops.CELLS names them all): their
# modules export as torch.nn's and follow torch.nn's dtypes under autocast.
TORCH_NN_CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


@torch._dynamo.assume_constant_result
def _in_onnx_export() -> bool:
    # Evaluated, not traced, under torch.export's strict mode (which the dynamo exporter
    # falls back to), where torch.onnx.is_in_onnx_export() would be traced as False.
    return torch.onnx.is_in_onnx_export()


def exporting() -> bool:
    """True while torch.onnx.export traces a model (the TorchScript and the dynamo exporter)."""
    # The TorchScript exporter traces with torch.jit, the dynamo exporter with torch.export;
    # these two cheap checks come first and keep the common path (no export, or
    # torch.compile) at well under a microsecond.
    return (torch.jit.is_tracing() or torch.compiler.is_exporting()) and _in_onnx_export()


def _torch_view(module: nn.RNNBase, cls: type) -> nn.RNNBase:
    """An instance of torch.nn's class ``cls`` that shares ``module``'s state (parameters,
    buffers and settings are the same objects), so that ``cls.forward`` runs on them."""
    view = cls.__new__(cls)
    view.__dict__.update(module.__dict__)
    # torch.nn's forward reads the weights from _flat_weights: rebuild it (on the view only)
    # from the parameters as they are now, e.g. as the exporter substitutes them.
    view._init_flat_weights()
    return view


def _reference_forward(module: nn.RNNBase, input, hx=None):
    """A module that torch.nn has no class for (pyrnn.RNN with nonlinearity="leaky_relu",
    pyrnn.LayerNormLSTM) during an export: the reference's stack of per-step operations,
    which the exporters trace."""
    from . import ops, reference

    mode = module._cell_mode
    if not isinstance(input, Tensor):
        from torch.onnx.errors import OnnxExporterError

        raise OnnxExporterError(f"pyrnn.{type(module).__name__} ({mode}): a PackedSequence "
                                "input cannot be exported; export with a padded tensor")
    has_cell = ops.CELLS[mode]["has_cell"]
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and module.batch_first:
        x = x.transpose(0, 1)
    D = 2 if module.bidirectional else 1
    LD, B, H = module.num_layers * D, x.shape[1], module.hidden_size
    if hx is None:
        hx = (x.new_zeros(LD, B, H), x.new_zeros(LD, B, H)) if has_cell else x.new_zeros(LD, B, H)
    elif not batched:
        hx = tuple(h.unsqueeze(1) for h in hx) if has_cell else hx.unsqueeze(1)
    h0, c0 = hx if has_cell else (hx, None)
    weights = [tuple(module._weights(layer, d)) + (module._cell_weight(layer, d),)
               for layer in range(module.num_layers) for d in range(D)]
    out, h_n, c_n = reference.stack(mode, x, h0, c0, weights, bidirectional=module.bidirectional,
                                    params=module._cell_params())
    state = (h_n, c_n) if has_cell else h_n
    if not batched:
        state = tuple(s.squeeze(1) for s in state) if has_cell else state.squeeze(1)
        return out.squeeze(1), state
    return (out.transpose(0, 1) if module.batch_first else out), state


def module_forward(module: nn.RNNBase, input, hx=None):
    """The forward of pyrnn.RNN, LSTM or GRU during an ONNX export: torch.nn's own."""
    if module._cell_mode not in TORCH_NN_CELLS:
        return _reference_forward(module, input, hx)
    if module.proj_size > 0:
        from torch.onnx.errors import OnnxExporterError

        raise OnnxExporterError(
            f"pyrnn.{type(module).__name__}: proj_size={module.proj_size} cannot be exported "
            "to ONNX: ONNX's LSTM operator has no projection (weight_hr). Export a model with "
            "proj_size=0.")
    return _TORCH_CLASS[module.mode].forward(_torch_view(module, _TORCH_CLASS[module.mode]),
                                             input, hx)


def cell_step(cell: nn.RNNCellBase, input: Tensor, hx):
    """(h', c') of a pyrnn cell during an ONNX export (c' is None except for the LSTM
    cells; hx is (h, c) or None for them): torch.nn's own cell forward for the cells
    torch.nn has, the reference's step as plain operators for the others (the leaky-ReLU
    Elman cell, the LayerNorm-LSTM), as module_forward does for the layers."""
    if cell._mode in TORCH_NN_CELLS:
        if isinstance(cell, nn.LSTMCell):
            return nn.LSTMCell.forward(cell, input, hx)
        base = nn.GRUCell if isinstance(cell, nn.GRUCell) else nn.RNNCell
        return base.forward(cell, input, hx), None
    from . import ops, reference

    has_cell = ops.CELLS[cell._mode]["has_cell"]
    batched = input.dim() == 2
    x = (input if batched else input.unsqueeze(0)).unsqueeze(0)  # [1, B, I]
    shape = (1, x.shape[1], cell.hidden_size)
    if hx is None:
        h = c = x.new_zeros(shape)
    else:
        h, c = (s.reshape(shape) for s in (hx if has_cell else (hx, hx)))
    weights = [(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, None,
                cell._cell_weight())]
    _, h_n, c_n = reference.stack(cell._mode, x, h, c if has_cell else None, weights,
                                  params=cell._cell_params())
    h_n, c_n = h_n[0], (c_n[0] if has_cell else None)  # the one layer
    if not batched:
        h_n, c_n = h_n[0], (c_n[0] if has_cell else None)
    return h_n, c_n
