"""ONNX export of pyrnn modules, and the way back to torch.nn (to_torch).

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


def module_forward(module: nn.RNNBase, input, hx=None):
    """The forward of pyrnn.RNN, LSTM or GRU during an ONNX export: torch.nn's own."""
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
    base = nn.GRUCell if isinstance(cell, nn.GRUCell) else nn.RNNCell
    return base.forward(cell, input, hx), None


def _torch_of() -> dict:
    from . import modules  # not at the top: pyrnn.modules imports this module

    return {modules.RNN: nn.RNN, modules.LSTM: nn.LSTM, modules.GRU: nn.GRU,
            modules.RNNCell: nn.RNNCell, modules.LSTMCell: nn.LSTMCell,
            modules.GRUCell: nn.GRUCell}


def _to_torch_one(m: nn.Module) -> nn.Module:
    cls = _torch_of()[type(m)]
    if isinstance(m, nn.RNNCellBase):
        w = m.weight_ih
        kw = dict(bias=m.bias, device=w.device, dtype=w.dtype)
        if cls is nn.RNNCell:
            kw["nonlinearity"] = m.nonlinearity
    else:
        w = m.weight_ih_l0
        kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                  dropout=m.dropout, bidirectional=m.bidirectional, device=w.device,
                  dtype=w.dtype)
        if cls is nn.RNN:
            kw["nonlinearity"] = m.nonlinearity
        if cls is nn.LSTM:
            kw["proj_size"] = m.proj_size
    new = cls(m.input_size, m.hidden_size, **kw)
    new.load_state_dict(m.state_dict())
    for (_, p_new), (_, p_old) in zip(new.named_parameters(), m.named_parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    new.train(m.training)
    return new


def to_torch(module: nn.Module) -> nn.Module:
    """The inverse of pyrnn.convert: replace every pyrnn.RNN, LSTM, GRU and cell inside
    ``module`` (in place) by its torch.nn equivalent with the same weights, device, dtype,
    requires_grad and training mode. Returns the module (a bare pyrnn module passed in
    directly is returned converted). pyrnn's own settings (bptt_clip, record_grad_norms,
    record_gate_stats) have no torch.nn counterpart and are dropped."""
    classes = _torch_of()
    if type(module) in classes:
        return _to_torch_one(module)
    for name, child in list(module.named_children()):
        if type(child) in classes:
            setattr(module, name, _to_torch_one(child))
        else:
            to_torch(child)
    return module
