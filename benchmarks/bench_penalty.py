"""Cost of the vanishing-gradient regulariser: forward + backward of pyrnn.RNN (tanh) with
vanishing_penalty on against off, side by side in one process (A B A B after a warm-up,
medians), float32. Usage: python benchmarks/bench_penalty.py [--reps N]"""
import argparse
import statistics
import time

import torch

import pyrnn

SHAPES = {"S1": (100, 32, 128), "S2": (100, 32, 512), "S3": (500, 8, 256), "S4": (100, 1, 64)}


def step(m, x):
    m.zero_grad(set_to_none=True)
    out, _ = m(x)
    out.sum().backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per side")
    ap.add_argument("--shapes", default="S1,S2,S3,S4", help="comma-separated of S1-S4")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.reps} reps, "
          f"medians; fwd+bwd of RNN-tanh, float32")
    # on/off: the ratio of the medians; paired: the median of the ratios of the pairs run
    # back to back (steadier when the machine's speed drifts)
    print(f"{'shape':6} {'T':>4} {'B':>3} {'H':>4} {'off ms':>8} {'on ms':>8} {'on/off':>7} "
          f"{'paired':>7}")
    for name in args.shapes.split(","):
        T, B, H = SHAPES[name]
        torch.manual_seed(0)
        off = pyrnn.RNN(H, H)
        on = pyrnn.RNN(H, H, vanishing_penalty=0.1)
        on.load_state_dict(off.state_dict())
        x = torch.randn(T, B, H, requires_grad=True)
        for m in (off, on, off, on):
            step(m, x)
        times = {"off": [], "on": []}
        for _ in range(args.reps):
            for key, m in (("off", off), ("on", on)):
                t0 = time.perf_counter()
                step(m, x)
                times[key].append(time.perf_counter() - t0)
        a, b = statistics.median(times["off"]) * 1e3, statistics.median(times["on"]) * 1e3
        paired = statistics.median(y / x for x, y in zip(times["off"], times["on"]))
        print(f"{name:6} {T:4d} {B:3d} {H:4d} {a:8.2f} {b:8.2f} {b / a:7.3f} {paired:7.3f}",
              flush=True)


if __name__ == "__main__":
    main()
