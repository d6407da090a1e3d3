"""The products of a float32 inference call alone, on torch's own BLAS, against whole calls.

For each cell and shape it times, interleaved in rounds in one process (2 threads by
default, medians over rounds, milliseconds):

  projection  torch.mm of x [T*B, I] by W_ih^T: the input projection over all rows
  steps       T calls of torch.addmm of h [B, H] by W_hh^T into the step's gate rows:
              the recurrent products, one step after the other
  products    projection + steps: what torch's BLAS (MKL on Intel CPUs) needs for the
              call's matrix products alone, with no activation, no state and no thread
              barrier between the steps
  pyrnn       the whole pyrnn call under no_grad (products, activations, states)
  torch.nn    the whole torch.nn call under no_grad

With --bf16 the same under torch.autocast("cpu", dtype=torch.bfloat16): the products
take bfloat16 operands (on the CPU's matrix units where torch's oneDNN has them), and
the whole calls run under that autocast.

`pyrnn/products` below 1 means that pyrnn's whole call runs in less time than torch's
BLAS needs for its products alone: then no product of that library, used as torch uses
it, leaves room for the call to run faster. `GFLOP/s` is the products' flops over the
`products` time.

    python benchmarks/bench_products.py [--rounds 9] [--cells lstm,gru] [--shapes S1,S2,S3]
    python benchmarks/bench_products.py --bf16 --cells lstm,gru
"""
import argparse
import contextlib
import statistics
import time

import torch

import pyrnn
from bench_runtimes import cpu_model

SHAPES = {"S1": (100, 32, 128), "S2": (100, 32, 512), "S3": (500, 8, 256)}
CELLS = {"rnn_tanh": ("RNN", 1), "lstm": ("LSTM", 4), "gru": ("GRU", 3)}


def sides(cell, T, B, H, bf16):
    name, G = CELLS[cell]
    ref = getattr(torch.nn, name)(H, H)
    mod = pyrnn.convert(ref)
    x = torch.randn(T, B, H)
    low = torch.bfloat16 if bf16 else torch.float32
    w_ih_t = ref.weight_ih_l0.detach().t().contiguous().to(low)
    w_hh_t = ref.weight_hh_l0.detach().t().contiguous().to(low)
    h = torch.randn(B, H, dtype=low)
    gates = torch.empty(T * B, G * H, dtype=low)
    steps = gates.view(T, B, G * H)
    flat = x.view(T * B, H).to(low)
    mode = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def projection():
        torch.mm(flat, w_ih_t, out=gates)

    def recurrent():
        for t in range(T):
            torch.addmm(steps[t], h, w_hh_t, out=steps[t])

    def whole(m):
        def call():
            with torch.no_grad(), mode():
                m(x)
        return call

    return {"projection": projection, "steps": recurrent, "pyrnn": whole(mod),
            "torch.nn": whole(ref)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", default="rnn_tanh,lstm,gru")
    ap.add_argument("--shapes", default="S1,S2,S3")
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 products, the whole calls under bfloat16 autocast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{cpu_model()}; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} rounds, medians; "
          f"{'bfloat16 autocast' if args.bf16 else 'float32'} inference")
    print(f"{'cell':8} {'shape':5} {'projection':>10} {'steps':>8} {'products':>9} "
          f"{'pyrnn':>8} {'torch.nn':>9} {'pyrnn/products':>15} {'GFLOP/s':>8}")
    for cell in args.cells.split(","):
        for shape in args.shapes.split(","):
            T, B, H = SHAPES[shape]
            fns = sides(cell, T, B, H, args.bf16)
            times = {k: [] for k in fns}
            for f in fns.values():
                f()
            for r in range(args.rounds):
                order = list(fns) if r % 2 == 0 else list(fns)[::-1]
                for k in order:
                    fns[k]()
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
            prods = [a + b for a, b in zip(times["projection"], times["steps"])]
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            p = statistics.median(prods) * 1e3
            G = CELLS[cell][1]
            flops = 2.0 * T * B * 2 * H * G * H
            ratio = statistics.median(a / b for a, b in zip(times["pyrnn"], prods))
            print(f"{cell:8} {shape:5} {med['projection']:10.2f} {med['steps']:8.2f} {p:9.2f} "
                  f"{med['pyrnn']:8.2f} {med['torch.nn']:9.2f} {ratio:15.2f} "
                  f"{flops / p / 1e6:8.0f}", flush=True)


if __name__ == "__main__":
    main()
