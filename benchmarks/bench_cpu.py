"""pyrnn against torch.nn (and the plain-PyTorch reference) on the CPU.

For RNN-tanh, LSTM and GRU, float32, input_size = hidden_size, at the shapes
S1 (T=100, B=32, H=128), S2 (T=100, B=32, H=512), S3 (T=500, B=8, H=256) and
S4 (T=100, B=1, H=64), it times forward under no_grad and forward + backward, with
the two sides interleaved (A B A B ...) in one process, and prints per row:
  - the median time of each side, and the median over the interleaved pairs of the
    ratio pyrnn / torch.nn (lower is better; pairs share the machine's state, which
    drifts on a shared machine);
  - the share of a roofline: the step's matmul FLOPs over the time, divided by the
    float32 matmul throughput measured in this process just before and after the row;
  - the bytes saved for backward by each side (saved_tensors_hooks), and their ratio.

    python benchmarks/bench_cpu.py            # the full table
    python benchmarks/bench_cpu.py --quick    # fewer repetitions, a smoke run
"""
import argparse
import json
import statistics
import sys
import time

import torch

import pyrnn
from pyrnn import reference

SHAPES = {"S1": (100, 32, 128), "S2": (100, 32, 512), "S3": (500, 8, 256), "S4": (100, 1, 64)}
# The cells with a torch.nn counterpart to time against, with their gate counts from the
# registry (pyrnn.ops.GATES).
CELLS = {
    "rnn_tanh": (torch.nn.RNN, pyrnn.RNN, pyrnn.ops.GATES["rnn_tanh"]),
    "lstm": (torch.nn.LSTM, pyrnn.LSTM, pyrnn.ops.GATES["lstm"]),
    "gru": (torch.nn.GRU, pyrnn.GRU, pyrnn.ops.GATES["gru"]),
}


def matmul_gflops(n=512, reps=20):
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while fn() runs."""
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            try:
                key = t.untyped_storage().data_ptr()
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_pair(fa, fb, reps, warmup=3, warmup_s=0.3):
    t0 = time.perf_counter()
    n = 0
    while n < warmup or time.perf_counter() - t0 < warmup_s:  # caches, clocks, thread pool
        fa()
        fb()
        n += 1
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timed(fa))
        tb.append(timed(fb))
    return statistics.median(ta), statistics.median(tb), statistics.median(
        b / a for a, b in zip(ta, tb))


def make_pair(cell, T, B, H, seed=0):
    tcls, pcls, G = CELLS[cell]
    torch.manual_seed(seed)
    ref_m = tcls(H, H)
    ours = pcls(H, H)
    ours.load_state_dict(ref_m.state_dict())
    x = torch.randn(T, B, H)
    g = torch.randn(T, B, H)
    return ref_m, ours, x, g


def run_fwd(m, x):
    def f():
        with torch.no_grad():
            return m(x)
    return f


def run_fwdbwd(m, x, g):
    params = list(m.parameters())

    def f():
        for p in params:
            p.grad = None
        y, _ = m(x)
        y.backward(g)
    return f


def reference_fwdbwd(cell, m, x, g):
    w = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0]
    fn = getattr(reference, cell)
    B, H = x.shape[1], m.hidden_size

    def f():
        h0 = x.new_zeros(B, H)
        out = fn(x, h0, h0, *w)[0] if cell == "lstm" else fn(x, h0, *w)[0]
        out.backward(g)
    return f


def step_flops(G, B, I, H):
    # forward: x W_ih^T and h W_hh^T; backward: three products of the same size each
    return 2 * B * (I + H) * G * H


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per side")
    ap.add_argument("--cells", default="rnn_tanh,lstm,gru")
    ap.add_argument("--shapes", default="S1,S2,S3,S4")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--reference", action="store_true",
                    help="also time the plain-PyTorch reference (slow)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--no-extra", action="store_true",
                    help="skip the recording, packed and bidirectional rows")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 15)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"float32 matmul {matmul_gflops():.1f} GFLOP/s (512^3; each row's roofline uses the "
          f"throughput measured just before and after it), {reps} reps, medians")
    hdr = (f"{'cell':8} {'shape':5} {'pass':8} {'torch.nn ms':>11} {'pyrnn ms':>9} {'ratio':>6} "
           f"{'roofline':>8} {'saved MB nn':>11} {'pyrnn':>7} {'ratio':>6}")
    if args.reference:
        hdr += f" {'ref ms':>8}"
    print(hdr)
    rows = []
    for cell in args.cells.split(","):
        G = CELLS[cell][2]
        for sname in args.shapes.split(","):
            T, B, H = SHAPES[sname]
            nn_m, ours, x, g = make_pair(cell, T, B, H)
            flops = step_flops(G, B, H, H) * T
            sb_nn = saved_bytes(lambda: nn_m(x))
            sb_py = saved_bytes(lambda: ours(x))
            for pas in args.passes.split(","):
                if pas == "fwd":
                    a, b = run_fwd(nn_m, x), run_fwd(ours, x)
                    fl = flops
                else:
                    a, b = run_fwdbwd(nn_m, x, g), run_fwdbwd(ours, x, g)
                    fl = 3 * flops  # backward: dh W_hh, dW_ih, dW_hh (dX not needed here)
                # torch.mm's throughput, taken around the row: this machine's speed drifts
                before = matmul_gflops(reps=7)
                tn, tp, ratio = bench_pair(a, b, reps)
                peak = (before + matmul_gflops(reps=7)) / 2
                row = dict(cell=cell, shape=sname, T=T, B=B, H=H, pass_=pas, torch_ms=tn * 1e3,
                           pyrnn_ms=tp * 1e3, ratio=ratio,
                           roofline=fl / tp / 1e9 / peak,
                           saved_nn=sb_nn, saved_pyrnn=sb_py)
                line = (f"{cell:8} {sname:5} {pas:8} {tn*1e3:11.2f} {tp*1e3:9.2f} {ratio:6.2f} "
                        f"{100*row['roofline']:7.1f}% ")
                if pas == "fwd+bwd":
                    line += f"{sb_nn/2**20:11.2f} {sb_py/2**20:7.2f} {sb_py/sb_nn:6.2f}"
                else:
                    line += f"{'':11} {'':7} {'':6}"
                if args.reference and pas == "fwd+bwd":
                    tr = statistics.median(timed(reference_fwdbwd(cell, ours, x, g))
                                           for _ in range(max(1, reps // 5)))
                    row["reference_ms"] = tr * 1e3
                    line += f" {tr*1e3:8.1f}"
                print(line, flush=True)
                rows.append(row)
    if not args.no_extra:
        rows += extra_rows(reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def extra_rows(reps):
    """Gradient-norm recording overhead, PackedSequence and bidirectional layers (LSTM, S1)."""
    from torch.nn.utils.rnn import pack_padded_sequence
    T, B, H = SHAPES["S1"]
    out = []
    print(f"\nLSTM at S1 (T={T}, B={B}, H={H}), forward + backward, medians:")
    print(f"{'case':44} {'A ms':>8} {'B ms':>8} {'B/A':>6}")

    def line(name, ta, tb, ratio):
        print(f"{name:44} {ta*1e3:8.2f} {tb*1e3:8.2f} {ratio:6.3f}", flush=True)
        out.append(dict(case=name, a_ms=ta * 1e3, b_ms=tb * 1e3, ratio=ratio))

    nn_m, ours, x, g = make_pair("lstm", T, B, H)
    rec = pyrnn.LSTM(H, H, record_grad_norms=True)
    rec.load_state_dict(ours.state_dict())
    ta, tb, r = bench_pair(run_fwdbwd(ours, x, g), run_fwdbwd(rec, x, g), reps)
    line("A: pyrnn, B: pyrnn record_grad_norms=True", ta, tb, r)

    lengths = torch.full((B,), T, dtype=torch.long)
    lengths[::2] = torch.randint(1, T, (B // 2,), generator=torch.Generator().manual_seed(0))
    n_tokens = int(lengths.sum())

    def packed_run(m, xx, lens):
        params = list(m.parameters())

        def f():
            for p in params:
                p.grad = None
            y, _ = m(pack_padded_sequence(xx, lens, enforce_sorted=False))
            y.data.backward(torch.ones_like(y.data))
        return f

    # packed against the same batch padded to T x B, and against a padded batch with the
    # same number of tokens (T' x B, fewer steps)
    ta, tb, r = bench_pair(run_fwdbwd(ours, x, torch.ones(T, B, H)), packed_run(ours, x, lengths),
                        reps)
    line(f"A: pyrnn padded {T}x{B}, B: same batch packed", ta, tb, r)
    Tp = max(1, n_tokens // B)
    xp, gp = torch.randn(Tp, B, H), torch.ones(Tp, B, H)
    ta, tb, r = bench_pair(run_fwdbwd(ours, xp, gp), packed_run(ours, x, lengths), reps)
    line(f"A: pyrnn padded {Tp}x{B}, B: packed {n_tokens} tokens", ta, tb, r)
    ta, tb, r = bench_pair(packed_run(nn_m, x, lengths), packed_run(ours, x, lengths), reps)
    line("packed unsorted: A torch.nn, B pyrnn", ta, tb, r)
    torch.manual_seed(0)
    nn_bi = torch.nn.LSTM(H, H, bidirectional=True)
    py_bi = pyrnn.LSTM(H, H, bidirectional=True)
    py_bi.load_state_dict(nn_bi.state_dict())
    g2 = torch.randn(T, B, 2 * H)
    ta, tb, r = bench_pair(run_fwdbwd(nn_bi, x, g2), run_fwdbwd(py_bi, x, g2), reps)
    line("bidirectional: A torch.nn, B pyrnn", ta, tb, r)
    return out


if __name__ == "__main__":
    sys.exit(main())
