"""pyrnn: fused RNN, LSTM and GRU kernels for PyTorch, with gradient-flow instrumentation.

Drop-in modules: pyrnn.RNN, pyrnn.LSTM, pyrnn.GRU (same arguments, parameters and
results as torch.nn's). Per-layer ops: pyrnn.ops. Plain-PyTorch oracles: pyrnn.reference.
"""
import torch  # noqa: F401  (loads the libraries the extension links against)

try:
    from . import _C  # noqa: F401  (the compiled extension; registers torch.ops.pyrnn)
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"pyrnn: cannot load the compiled extension pyrnn._C next to {__file__} ({e}). "
        "If this is the source tree of a non-editable install, run from another directory "
        "(or use the `pyrnn` command); otherwise build it with "
        "`pip install --no-build-isolation -e .`") from e

if _C.cpu_capability_error():  # PYRNN_CPU_CAPABILITY names a copy this CPU can't run
    import warnings
    warnings.warn(_C.cpu_capability_error(), RuntimeWarning, stacklevel=2)

from . import ops, reference
from ._C import has_cuda as _has_cuda
from . import gradflow, init
from .modules import (GRU, LSTM, RNN, GateStats, GradNorms, GRUCell, LayerNormLSTM,
                      LayerNormLSTMCell, LSTMCell,
                      RNNCell, convert, to_torch)

__version__ = "0.1.0"


def backends():
    """The backends compiled into this build, e.g. ['cpu'] or ['cpu', 'cuda']."""
    return ["cpu"] + (["cuda"] if _has_cuda() else [])


__all__ = ["RNN", "LSTM", "GRU", "LayerNormLSTM", "LayerNormLSTMCell", "RNNCell", "LSTMCell", "GRUCell", "convert", "to_torch", "ops",
           "reference", "gradflow", "init", "backends", "GradNorms", "GateStats"]
