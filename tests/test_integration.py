"""torch.compile, pickling, cells and DistributedDataParallel (autocast: test_autocast.py)."""
import copy
import io
import os
import pickle
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyrnn


@pytest.mark.parametrize("cls", [pyrnn.RNN, pyrnn.LSTM, pyrnn.GRU])
def test_compile_fullgraph_inductor(cls):
    torch.manual_seed(0)
    m = cls(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4)
    out, _ = m(x)
    cot = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(m.parameters()), cot)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="inductor")
    out2, _ = cm(x)
    grads2 = torch.autograd.grad(out2, list(m.parameters()), cot)
    # the compiled graph calls the same kernels in the same order: equal up to float32
    # rounding of the surrounding glue ops (concatenation, stacking)
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_torch_nn_graph_breaks_where_pyrnn_does_not():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        torch.compile(torch.nn.LSTM(3, 4), fullgraph=True)(torch.randn(2, 1, 3))


@pytest.mark.parametrize("cls", [pyrnn.RNN, pyrnn.LSTM, pyrnn.GRU])
def test_pickle_deepcopy_save_load(cls):
    m = cls(3, 5, num_layers=2, bidirectional=True, bptt_clip=0.5)
    x = torch.randn(4, 2, 3)
    ref = m(x)[0]
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert type(clone) is cls and clone.bptt_clip == 0.5
        torch.testing.assert_close(clone(x)[0], ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], ref, rtol=0, atol=0)


@pytest.mark.parametrize("tcls,pcls", [(torch.nn.RNNCell, pyrnn.RNNCell),
                                       (torch.nn.LSTMCell, pyrnn.LSTMCell),
                                       (torch.nn.GRUCell, pyrnn.GRUCell)])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_cells_match_torch(tcls, pcls, unbatched, with_hx):
    torch.manual_seed(0)
    t = tcls(4, 6, dtype=torch.float64)
    p = pcls(4, 6, dtype=torch.float64)
    p.load_state_dict(t.state_dict())
    x = torch.randn(*(() if unbatched else (3,)), 4, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        h = torch.randn(*(() if unbatched else (3,)), 6, dtype=torch.float64)
        hx = (h, h * 0.5) if tcls is torch.nn.LSTMCell else h
    a, b = t(x, hx), p(x, hx)
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    cot = [torch.randn_like(o) for o in a]
    ga = torch.autograd.grad(a, [x, *t.parameters()], cot)
    gb = torch.autograd.grad(b, [x, *p.parameters()], cot)
    for u, v in zip(a + ga, b + gb):  # float64, one step: rounding only
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)


def test_convert_replaces_cells_and_layers():
    model = torch.nn.ModuleDict({"cell": torch.nn.GRUCell(3, 4), "rnn": torch.nn.RNN(3, 4)})
    model.eval()
    pyrnn.convert(model)
    assert type(model["cell"]) is pyrnn.GRUCell and type(model["rnn"]) is pyrnn.RNN
    assert not model["cell"].training


def _ddp_worker(rank, world, store, state, x, cot, out_path):
    # a file store, not TCP: no port to pick and no port to collide on
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = pyrnn.LSTM(3, 5, num_layers=2, batch_first=True)
    m.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    shard = slice(rank * 2, rank * 2 + 2)
    out, _ = ddp(x[shard])
    # mean over the full batch: each rank's share, summed by DDP's all-reduce average x world
    (out * cot[shard]).sum().div(x.shape[0]).mul(world).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in m.named_parameters()}, out_path)
    dist.barrier()  # both ranks leave together: no peer closes its connection early
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: in CI a spawned worker twice aborted there
    # ("terminate called without an active exception") after its work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_gloo_matches_single_process(tmp_path):
    torch.manual_seed(0)
    m = pyrnn.LSTM(3, 5, num_layers=2, batch_first=True)
    x = torch.randn(4, 6, 3)
    cot = torch.randn(4, 6, 5)
    out, _ = m(x)
    (out * cot).sum().div(4).backward()
    path = str(tmp_path / "grads.pt")
    store = str(tmp_path / "store")
    mp.spawn(_ddp_worker, args=(2, store, m.state_dict(), x, cot, path), nprocs=2)
    ddp_grads = torch.load(path)
    for n, p in m.named_parameters():
        # float32; the two halves are summed in another order than the full batch
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [pyrnn.RNN, pyrnn.LSTM, pyrnn.GRU])
def test_recording_under_compile_fullgraph(cls):
    # The backward writes the norms into a store the module keeps, which the compiled
    # graph takes as an input; with fullgraph=True it is reserved eagerly first. The gate
    # statistics of the forward come out of the graph.
    torch.manual_seed(0)
    m = cls(4, 6, num_layers=2, bidirectional=True, record_grad_norms=True,
            record_gate_stats=True)
    x = torch.randn(5, 3, 4)
    cot = torch.randn(5, 3, 12)
    m(x)[0].backward(cot)
    eager, eager_stats = m.grad_norms, m.gate_stats
    torch._dynamo.reset()
    m.reserve_grad_norms(5, 3)
    cm = torch.compile(m, fullgraph=True, backend="inductor")
    for _ in range(2):  # the second call runs the cached graph
        cm(x)[0].backward(cot)
        rec = m.grad_norms
        # same kernels in the same order; float32 rounding of the glue ops may differ
        torch.testing.assert_close(rec.hidden, eager.hidden, rtol=1e-6, atol=1e-7)
        if cls is pyrnn.LSTM:
            torch.testing.assert_close(rec.cell, eager.cell, rtol=1e-6, atol=1e-7)
        assert rec.hidden.shape == (4, 5, 3) and rec.hidden.min() > 0
        stats = m.gate_stats
        torch.testing.assert_close(stats.factor, eager_stats.factor, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stats.saturated, eager_stats.saturated, rtol=0, atol=0)


def test_recording_under_fullgraph_without_reservation_says_what_to_do():
    torch._dynamo.reset()
    m = pyrnn.LSTM(3, 4, record_grad_norms=True)
    with pytest.raises(Exception, match=r"call module.reserve_grad_norms\(T, B\)"):
        torch.compile(m, fullgraph=True)(torch.randn(5, 2, 3))


@pytest.mark.parametrize("how", ["grows", "dynamic"])
def test_recording_under_compile_across_shapes(how):
    # grows: no reservation, so the store grows at a graph break for each larger shape.
    # dynamic: one reservation, then one fullgraph graph with symbolic T and B serves
    # every smaller input.
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = pyrnn.LSTM(3, 4, record_grad_norms=True)
    ref = pyrnn.LSTM(3, 4, record_grad_norms=True)
    ref.load_state_dict(m.state_dict())
    if how == "grows":
        cm = torch.compile(m, backend="inductor")
        shapes = [(4, 2), (7, 3), (5, 2)]
    else:
        m.reserve_grad_norms(10, 4)
        cm = torch.compile(m, fullgraph=True, dynamic=True, backend="inductor")
        shapes = [(5, 2), (7, 3), (9, 4)]
    for T, B in shapes:
        x = torch.randn(T, B, 3)
        cm(x)[0].sum().backward()
        ref(x)[0].sum().backward()
        assert m.grad_norms.hidden.shape == (1, T, B)
        # same kernels; float32 rounding of the glue ops may differ
        torch.testing.assert_close(m.grad_norms.hidden, ref.grad_norms.hidden, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.grad_norms.cell, ref.grad_norms.cell, rtol=1e-6, atol=1e-7)


def test_concurrent_calls_from_python_threads():
    # Each calling thread keeps its own packing buffers (csrc/cpu/gemm.h); weights of 1 MB
    # take the threaded packing. Calls from several Python threads at once, each reusing
    # its buffers across calls and sizes, give the bits of the same calls made one by one.
    import threading

    torch.manual_seed(0)
    mods = [pyrnn.LSTM(256, 256), pyrnn.GRU(64, 512), pyrnn.RNN(128, 128)]
    xs = [torch.randn(3, 4, m.input_size) for m in mods]

    def run():
        out = []
        for m, x in zip(mods, xs):
            y, _ = m(x)
            y.sum().backward()
            out.append((y.detach().clone(), [p.grad.clone() for p in m.parameters()]))
            m.zero_grad()
        return out

    with torch.no_grad():
        want_inf = [m(x)[0] for m, x in zip(mods, xs)]
    got = {}

    def worker(k):
        with torch.no_grad():
            for _ in range(5):
                got.setdefault(k, []).append([m(x)[0] for m, x in zip(mods, xs)])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        for outs in got[k]:
            assert all(torch.equal(a, b) for a, b in zip(outs, want_inf))
    # training calls one after the other, then again: the kept buffers give the same bits
    first, second = run(), run()
    for (y1, g1), (y2, g2) in zip(first, second):
        assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
