"""What a call of a pyrnn module costs besides its arithmetic, on the CPU.

For each cell, at S4 (T=100, B=1, H=64, where the arithmetic is small), at T=1 (where it
is next to nothing) and at one step of B=32, H=512 (T1big: a step of a decoder, where
packing the weights is as much work as the step), it times, interleaved in rounds in one
process:

  module   the pyrnn module (pyrnn.LSTM, ...): argument checks, states, the layer loop
  layer    pyrnn.ops.layer, the op with its autograd wrapper, for the same layer
  kernel   torch.ops.pyrnn.forward (and .backward) called below autograd: the dispatcher,
           the C++ checks and allocation, the weight packing and the time loop
  torch.nn the torch.nn module with the same weights

  1 op     torch's smallest call of the kind: one elementwise product of the input's
           size (in training with its backward through torch's engine)

so that module - layer is the module's Python, layer - kernel the autograd wrapper's,
the T=1 kernel time is the op's fixed cost, and `1 op` the floor below which no torch
module's call of that kind goes. Each side runs twice in a round and the
second call is timed (warm caches: the sides leave each other's data in cache
unevenly). Medians over rounds, microseconds.

With --cold S each side's timed call comes instead S seconds after the last call of any
side, as in bench_runtimes.py's rounds (5 ms there), and an `empty` column times a call
of nothing under no_grad: the floor of any call that follows such a pause on this machine.

    python benchmarks/bench_overhead.py [--rounds 200] [--threads 2]
    python benchmarks/bench_overhead.py --cold 0.005 --shapes S4
"""
import argparse
import statistics
import time

import torch

import pyrnn
from bench_runtimes import cpu_model

SHAPES = {"S4": (100, 1, 64), "T1": (1, 1, 64), "T1big": (1, 32, 512)}
CELLS = {"rnn_tanh": "RNN", "lstm": "LSTM", "gru": "GRU"}


def sides(mode, T, B, H, train):
    ref = getattr(torch.nn, CELLS[mode])(H, H)
    mod = pyrnn.convert(ref)
    x = torch.randn(T, B, H)
    h0 = torch.zeros(B, H)
    w = [mod.weight_ih_l0, mod.weight_hh_l0, mod.bias_ih_l0, mod.bias_hh_l0]
    cx = h0 if mode == "lstm" else None
    g = torch.randn(T, B, H)

    def forward_op():
        return torch.ops.pyrnn.forward(mode, x, h0, cx, *w, None, None, False, train, 0.0,
                                       None, 0.0, None, None, [], None)

    if not train:
        def run(f):
            def call():
                with torch.no_grad():
                    f()
            return call
        kernel_fn = forward_op
    else:
        def run(f):
            def call():
                out = f()
                out = out[0] if isinstance(out, tuple) else out
                out.backward(g)
            return call

        def kernel_fn():
            out, _, _, ws = forward_op()
            torch.ops.pyrnn.backward(mode, g, None, None, x, h0, cx, w[0], w[1], None, True,
                                     False, None, out, ws, False, 0.0, False, 0.0, [], None)

    def kernel():
        with torch._C._AutoDispatchBelowAutograd():
            kernel_fn()

    # torch's floor: its smallest call of the same kind, one elementwise product of the
    # input's size (with its backward engine in training)
    leaf = x.clone().requires_grad_(train)
    return {
        "module": run(lambda: mod(x)),
        "layer": run(lambda: pyrnn.ops.layer(mode, x, h0, cx, *w)),
        "kernel": kernel,
        "torch.nn": run(lambda: ref(x)),
        "1 op": run(lambda: leaf * 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", type=float, default=0.0,
                    help="seconds of sleep before each timed call (0: a warm call before it)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated")
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = f"(pyrnn CPU loops: {pyrnn._C.cpu_capability()})"
    when = f"{args.cold * 1e3:g} ms after the last call" if args.cold else "warm"
    print(f"{cpu_model()}; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} rounds, medians in microseconds, each call {when} {info}")
    print(f"{'cell':9}{'shape':7}{'pass':10}{'module':>9}{'layer':>9}{'kernel':>9}"
          f"{'torch.nn':>10}{'module py':>11}{'wrapper':>9}{'1 op':>7}"
          + (f"{'empty':>7}" if args.cold else ""))
    for mode in args.cells.split(","):
        for shape in args.shapes.split(","):
            T, B, H = SHAPES[shape]
            for train in (False, True):
                fns = sides(mode, T, B, H, train)
                if args.cold:
                    fns["empty"] = empty_call
                for f in fns.values():
                    for _ in range(20):
                        f()
                times = {k: [] for k in fns}
                for _ in range(args.rounds):
                    for k, f in fns.items():
                        if args.cold:
                            time.sleep(args.cold)
                        else:
                            f()  # untimed: the timed call finds its data in cache
                        t = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t)
                med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
                print(f"{mode:9}{shape:7}{'training' if train else 'inference':10}"
                      f"{med['module']:9.0f}{med['layer']:9.0f}{med['kernel']:9.0f}"
                      f"{med['torch.nn']:10.0f}{med['module'] - med['layer']:11.0f}"
                      f"{med['layer'] - med['kernel']:9.0f}{med['1 op']:7.0f}"
                      + (f"{med['empty']:7.0f}" if args.cold else ""))


def empty_call():
    with torch.no_grad():
        pass


if __name__ == "__main__":
    main()
