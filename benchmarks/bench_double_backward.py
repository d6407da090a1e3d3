"""Double backward: a gradient-penalty step, pyrnn against torch.nn on the CPU.

One step is: out = m(x); loss = <out, g>; grads = d loss / d params (create_graph=True);
(loss + sum ||grads||^2).backward(). pyrnn's first backward then takes its gradients from
the differentiable reference formulation (pyrnn.reference.layer_grads) instead of the
fused kernel. For comparison it also times the plain step (forward + backward), where
pyrnn runs its fused kernels. Float32, one layer, input_size = hidden_size, sides
interleaved (A B A B ...) in one process; prints medians and the median of the per-pair
ratios pyrnn / torch.nn (lower is better).

    python benchmarks/bench_double_backward.py                 # T=50, B=16, H=64
    python benchmarks/bench_double_backward.py --T 100 --B 32 --H 128
"""
import argparse
import platform
import statistics
import time

import torch

import pyrnn

CELLS = {"rnn_tanh": (torch.nn.RNN, pyrnn.RNN), "lstm": (torch.nn.LSTM, pyrnn.LSTM),
         "gru": (torch.nn.GRU, pyrnn.GRU)}


def penalty_step(m, x, g):
    params = list(m.parameters())

    def f():
        for p in params:
            p.grad = None
        out, _ = m(x)
        loss = (out * g).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        (loss + sum((d * d).sum() for d in grads)).backward()
    return f


def plain_step(m, x, g):
    params = list(m.parameters())

    def f():
        for p in params:
            p.grad = None
        out, _ = m(x)
        out.backward(g)
    return f


def bench_pair(fa, fb, reps, warmup=3):
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return (statistics.median(ta), statistics.median(tb),
            statistics.median(b / a for a, b in zip(ta, tb)))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cells", default="rnn_tanh,lstm,gru")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"T={args.T} B={args.B} H={args.H}, float32, median of {args.reps}")
    print(f"{'cell':9} {'step':13} {'torch.nn ms':>11} {'pyrnn ms':>9} {'pyrnn/nn':>9}")
    for cell in args.cells.split(","):
        tcls, pcls = CELLS[cell]
        torch.manual_seed(0)
        ref = tcls(args.H, args.H)
        ours = pcls(args.H, args.H)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(args.T, args.B, args.H)
        g = torch.randn(args.T, args.B, args.H)
        for name, make in (("grad penalty", penalty_step), ("fwd+bwd", plain_step)):
            t_ref, t_ours, ratio = bench_pair(make(ref, x, g), make(ours, x, g), args.reps)
            print(f"{cell:9} {name:13} {t_ref * 1e3:11.2f} {t_ours * 1e3:9.2f} {ratio:9.2f}")


if __name__ == "__main__":
    main()
