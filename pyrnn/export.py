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


def _leaky_forward(module: nn.RNNBase, input, hx=None):
    """pyrnn.RNN with nonlinearity="leaky_relu", which torch.nn has no module for, during an
    export: the reference's stack of per-step operations, which the exporters trace."""
    from . import reference

    if not isinstance(input, Tensor):
        from torch.onnx.errors import OnnxExporterError

        raise OnnxExporterError("pyrnn.RNN(nonlinearity='leaky_relu'): a PackedSequence "
                                "input cannot be exported; export with a padded tensor")
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and module.batch_first:
        x = x.transpose(0, 1)
    D = 2 if module.bidirectional else 1
    if hx is None:
        hx = x.new_zeros(module.num_layers * D, x.shape[1], module.hidden_size)
    elif not batched:
        hx = hx.unsqueeze(1)
    weights = [module._weights(layer, d) for layer in range(module.num_layers)
               for d in range(D)]
    out, h_n, _ = reference.stack("rnn_leaky_relu", x, hx, None, weights,
                                  bidirectional=module.bidirectional,
                                  params=[module.negative_slope])
    if not batched:
        return out.squeeze(1), h_n.squeeze(1)
    return (out.transpose(0, 1) if module.batch_first else out), h_n


def module_forward(module: nn.RNNBase, input, hx=None):
    """The forward of pyrnn.RNN, LSTM or GRU during an ONNX export: torch.nn's own."""
    if module.mode == "RNN_LEAKY_RELU":
        return _leaky_forward(module, input, hx)
    if module.proj_size > 0:
        from torch.onnx.errors import OnnxExporterError

        raise OnnxExporterError(
            f"pyrnn.{type(module).__name__}: proj_size={module.proj_size} cannot be exported "
            "to ONNX: ONNX's LSTM operator has no projection (weight_hr). Export a model with "
            "proj_size=0.")
    return _TORCH_CLASS[module.mode].forward(_torch_view(module, _TORCH_CLASS[module.mode]),
                                             input, hx)


def cell_step(cell: nn.RNNCellBase, input: Tensor, hx):
    """(h', c') of pyrnn.RNNCell, LSTMCell or GRUCell during an ONNX export: torch.nn's own
    cell forward (c' is None except for the LSTM cell; hx is (h, c) or None for it)."""
    if isinstance(cell, nn.LSTMCell):
        return nn.LSTMCell.forward(cell, input, hx)
    if getattr(cell, "nonlinearity", None) == "leaky_relu":
        h = torch.zeros(input.shape[:-1] + (cell.hidden_size,), dtype=input.dtype,
                        device=input.device) if hx is None else hx
        a = nn.functional.linear(input, cell.weight_ih, cell.bias_ih)
        a = a + nn.functional.linear(h, cell.weight_hh, cell.bias_hh)
        return nn.functional.leaky_relu(a, cell.negative_slope), None
    base = nn.GRUCell if isinstance(cell, nn.GRUCell) else nn.RNNCell
    return base.forward(cell, input, hx), None
