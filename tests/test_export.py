"""ONNX export of pyrnn modules (both exporters of torch.onnx) and pyrnn.to_torch.

The exported model must be the one torch.nn's modules give: the same ONNX operators (the
RNN, LSTM and GRU operators wherever the exporter writes them for torch.nn), run in ONNX
Runtime to pyrnn's own results.
"""
import collections
import copy
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyrnn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

T, B, I, H = 5, 3, 4, 6
LENGTHS = [2, 5, 4]  # unsorted: the packed modules run with enforce_sorted=False


class Zoo(nn.Module):
    """pyrnn modules over the options that ONNX's operators express, in one model, so that
    one (slow) dynamo export covers them all. ``packed`` adds PackedSequence inputs, which
    torch.nn exports only with the TorchScript exporter."""

    def __init__(self, packed):
        super().__init__()
        self.packed = packed
        self.lstm = pyrnn.LSTM(I, H, 2, bidirectional=True, batch_first=True)  # hx given
        self.lstm_nb = pyrnn.LSTM(I, H, bias=False)  # no hx; also run unbatched
        self.gru = pyrnn.GRU(I, H, 2, bidirectional=True)  # hx given
        self.gru_bf = pyrnn.GRU(I, H, bias=False, batch_first=True)  # no hx
        self.rnn = pyrnn.RNN(I, H, 2, bidirectional=True, batch_first=True)  # hx given
        self.rnn_relu = pyrnn.RNN(I, H, nonlinearity="relu", bias=False)  # no hx
        self.lstm_cell = pyrnn.LSTMCell(I, H)
        self.gru_cell = pyrnn.GRUCell(I, H, bias=False)
        self.rnn_cell = pyrnn.RNNCell(I, H, nonlinearity="relu")
        if packed:
            self.lstm_p = pyrnn.LSTM(I, H, bidirectional=True)  # hx given
            self.gru_p = pyrnn.GRU(I, H)  # no hx
            self.rnn_p = pyrnn.RNN(I, H)  # hx given

    def forward(self, x, h2, c2, h1, lengths):
        xb = x.transpose(0, 1)
        outs = [*_flat(self.lstm(xb, (h2, c2))), *_flat(self.lstm_nb(x)),
                *_flat(self.lstm_nb(x[:, 0])), *_flat(self.gru(x, h2)), *_flat(self.gru_bf(xb)),
                *_flat(self.rnn(xb, h2)), *_flat(self.rnn_relu(x)),
                *self.lstm_cell(x[0], (h1, h1)), self.lstm_cell(x[0])[0],
                self.gru_cell(x[1]), self.gru_cell(x[1], h1), self.rnn_cell(x[2], h1)]
        if self.packed:
            for m, hx in ((self.lstm_p, (h2[:2], c2[:2])), (self.gru_p, None),
                          (self.rnn_p, h1[None])):
                seq = pack_padded_sequence(x, lengths, enforce_sorted=False)
                out, h = m(seq, hx)
                outs += [pad_packed_sequence(out)[0], *_flat(h)]
        return tuple(outs)


def _flat(result):
    """The tensors of a module's (output, h_n) or (output, (h_n, c_n))."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _flat(r)]


def _inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(T, B, I, generator=g), torch.randn(4, B, H, generator=g),
            torch.randn(4, B, H, generator=g), torch.randn(B, H, generator=g),
            torch.tensor(LENGTHS))


NAMES = ["x", "h2", "c2", "h1", "lengths"]


def _export(model, args, dynamo, path):
    """Exports ``model`` and returns (the ONNX graph, its outputs in ONNX Runtime)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the dynamo exporter logs its registry
        try:
            if dynamo:
                torch.onnx.export(model, args, path, dynamo=True, verbose=False)
            else:
                torch.onnx.export(model, args, path, dynamo=False, input_names=NAMES)
        finally:
            logging.disable(logging.NOTSET)
    graph = onnx.load(path).graph
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(args):
        feed = {i.name: args[NAMES.index(i.name)].numpy() for i in sess.get_inputs()}
        return [torch.from_numpy(o) for o in sess.run(None, feed)]
    return graph, run


# The recurrent operators torch.nn's modules export to, per exporter: each layer of a
# module call is one ONNX operator (both directions in one). The dynamo exporter writes
# LSTM and GRU but decomposes the Elman RNN into per-step MatMul/Add/Tanh/Relu (as
# torch.nn's RNN), and rejects PackedSequence input (as for torch.nn).
# Zoo: LSTM 2 layers + 1 + 1 (unbatched), GRU 2 + 1, RNN 2 + 1; packed: one each.
EXPECTED = {False: {"LSTM": 5, "GRU": 4, "RNN": 4}, True: {"LSTM": 4, "GRU": 3, "RNN": 0}}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_export_runs_in_onnxruntime_as_torch_nn(dynamo, tmp_path):
    packed = not dynamo
    model = Zoo(packed).eval()
    twin = pyrnn.to_torch(copy.deepcopy(model))  # the same model on torch.nn's modules
    assert not any(type(m).__module__.startswith("pyrnn") for m in twin.modules())
    args = _inputs()
    with torch.no_grad():
        ours, ref = model(*args), twin(*args)

    graph, run = _export(model, args, dynamo, tmp_path / "pyrnn.onnx")
    twin_graph, twin_run = _export(twin, args, dynamo, tmp_path / "torch.onnx")
    got, twin_got = run(args), twin_run(args)

    ops = collections.Counter(n.op_type for n in graph.node)
    # ONNX's own operators, one per layer and call, and exactly the graph torch.nn gives.
    assert {k: ops[k] for k in ("LSTM", "GRU", "RNN")} == EXPECTED[dynamo]
    assert ops == collections.Counter(n.op_type for n in twin_graph.node)
    assert not {"Loop", "Scan"} & set(ops)
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), {n.domain for n in graph.node}
    # Packed input reaches the operators as their sequence_lens (input 4).
    with_lengths = [n for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN")
                    and len(n.input) > 4 and n.input[4]]
    assert len(with_lengths) == (3 if packed else 0)

    assert len(got) == len(ours) == len(twin_got)
    for k, (o, p, t, ot) in enumerate(zip(got, ours, ref, twin_got)):
        assert o.shape == p.shape, k
        # The same graph on the same weights: ONNX Runtime gives the same numbers.
        torch.testing.assert_close(o, ot, rtol=0, atol=0, msg=f"output {k}")
        # Tolerance: float32 recurrences (ONNX Runtime's, pyrnn's, torch.nn's) round
        # differently. ONNX Runtime's error on torch.nn's own export plus pyrnn's distance
        # from torch.nn bounds |ONNX Runtime - pyrnn| (triangle inequality, in float64).
        o, p, t, ot = (v.double() for v in (o, p, t, ot))
        tol = (ot - t).abs().max().item() + (p - t).abs().max().item()
        assert tol < 1e-5, (k, tol)  # a few ulps at |values| ~ 1: the bound is not vacuous
        torch.testing.assert_close(o, p, rtol=0, atol=tol, msg=f"output {k}")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_export_proj_size_raises(dynamo, tmp_path):
    model = pyrnn.LSTM(I, H, proj_size=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.onnx.OnnxExporterError,
                           match="proj_size=2 cannot be exported to ONNX"):
            torch.onnx.export(model, (torch.randn(T, B, I),), tmp_path / "m.onnx",
                              dynamo=dynamo, verbose=False)


def test_export_leaves_eager_and_torch_export_alone():
    # Outside torch.onnx.export the modules run pyrnn's op, torch.export included.
    m = pyrnn.GRU(I, H)
    ep = torch.export.export(m, (torch.randn(T, B, I),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "pyrnn.forward.default" in targets
    assert not pyrnn.export.exporting()


def _torch_zoo():
    return nn.Sequential(
        nn.LSTM(I, H, 2, bidirectional=True, batch_first=True, proj_size=3),
        nn.ModuleDict({"gru": nn.GRU(I, H, bias=False), "rnn": nn.RNN(I, H, nonlinearity="relu"),
                       "cells": nn.ModuleList([nn.RNNCell(I, H, nonlinearity="relu"),
                                               nn.LSTMCell(I, H), nn.GRUCell(I, H, bias=False)])}),
        nn.Linear(H, 2))


def test_to_torch_inverts_convert():
    ref = _torch_zoo().double().eval()
    ref[0].weight_hh_l1.requires_grad_(False)
    ref[1]["cells"][1].bias_ih.requires_grad_(False)
    back = pyrnn.to_torch(pyrnn.convert(copy.deepcopy(ref)))
    assert [type(m) for m in back.modules()] == [type(m) for m in ref.modules()]
    assert back[1]["rnn"].nonlinearity == "relu" and back[1]["cells"][0].nonlinearity == "relu"
    assert back[0].proj_size == 3 and back[0].batch_first and back[0].bidirectional
    sd, sd_ref = back.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert sd[k].dtype == torch.float64 and torch.equal(sd[k], sd_ref[k]), k
    assert [p.requires_grad for p in back.parameters()] == [p.requires_grad for p in ref.parameters()]
    assert [m.training for m in back.modules()] == [False] * len(list(ref.modules()))
    x = torch.randn(B, T, I, dtype=torch.float64)
    assert torch.equal(back[0](x)[0], ref[0](x)[0])
    assert torch.equal(back[1]["cells"][1](x[:, 0])[1], ref[1]["cells"][1](x[:, 0])[1])


@pytest.mark.parametrize("cls", [pyrnn.RNN, pyrnn.LSTM, pyrnn.GRU, pyrnn.RNNCell,
                                 pyrnn.LSTMCell, pyrnn.GRUCell])
def test_to_torch_bare_module(cls):
    m = cls(I, H)  # training mode, float32
    t = pyrnn.to_torch(m)
    assert type(t) is getattr(nn, cls.__name__) and t.training
    x = torch.randn(T, B, I) if not isinstance(m, nn.RNNCellBase) else torch.randn(B, I)
    with torch.no_grad():
        got, want = _flat(t(x)), _flat(m(x))
    # torch.nn's float32 kernels against pyrnn's: a few ulps apart.
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # and back: convert(to_torch(m)) is m again.
    again = pyrnn.convert(t)
    assert type(again) is cls
    for (k, a), (_, b) in zip(again.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), k


def test_export_packed_lengths_are_an_input(tmp_path):
    # The TorchScript export of a model that packs its input runs other lengths (same
    # longest length) as pyrnn does: the lengths are not baked into the graph.
    model = Zoo(True).eval()
    _, run = _export(model, _inputs(), False, tmp_path / "m.onnx")
    args = (*_inputs()[:4], torch.tensor([3, 5, 1]))
    with torch.no_grad():
        want = model(*args)
    got = run(args)
    for k in range(len(want) - 7, len(want)):  # the packed modules' outputs and states
        # float32 against float32 over 5 steps, values of size ~1: the bound measured in
        # test_export_runs_in_onnxruntime_as_torch_nn stays below 1e-5 (a few ulps).
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=f"output {k}")
