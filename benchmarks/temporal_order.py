"""Temporal order with a tanh RNN: success over seeds, with and without gradient clipping
and the vanishing-gradient regulariser (Pascanu, Mikolov and Bengio 2013, sec. 4).

Each run is `pyrnn task temporal-order` with the given settings (plain SGD with momentum,
50 hidden units, batch 20); it stops at the first evaluation with a test error below 1%.
Prints one line per run and a table of successes per T and configuration.
Usage: python benchmarks/temporal_order.py --T 50,100,200 --seeds 5 --steps 2000
"""
import argparse
import time

from pyrnn import tasks

CONFIGS = {"plain": dict(clip=0.0, penalty=0.0), "clip": dict(clip=1.0, penalty=0.0),
           "penalty": dict(clip=0.0, penalty=2.0), "clip+penalty": dict(clip=1.0, penalty=2.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--T", default="50,100,200", help="comma-separated sequence lengths")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 per cell")
    ap.add_argument("--steps", type=int, default=2000, help="most updates per run")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated of "
                    + ", ".join(CONFIGS))
    ap.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    ap.add_argument("--clip", type=float, default=1.0, help="clipping threshold when on")
    ap.add_argument("--penalty", type=float, default=2.0, help="lambda when on")
    ap.add_argument("--eval-every", type=int, default=100, help="updates between tests")
    args = ap.parse_args()
    table = {}
    t_all = time.time()
    for T in (int(t) for t in args.T.split(",")):
        for name in args.configs.split(","):
            cfg = dict(CONFIGS[name])
            cfg["clip"] = args.clip if cfg["clip"] else 0.0
            cfg["penalty"] = args.penalty if cfg["penalty"] else 0.0
            for seed in range(args.seeds):
                r = tasks.train("temporal-order", cell="rnn_tanh", T=T, steps=args.steps,
                                lr=args.lr, eval_every=args.eval_every, seed=seed, **cfg)
                table.setdefault((T, name), []).append(r)
                from pyrnn import gradflow
                end = gradflow.analyse(r.flows["end"][0])
                print(f"T {T:4d} {name:13} seed {seed}: {'success' if r.success else 'no':7} "
                      f"after {r.steps:5d} updates, test error {r.error:.3f}, end decay "
                      f"{end.decay_rate:.3f}/step, {r.seconds:.0f} s", flush=True)
    print(f"\nsuccesses (test error < 1% within {args.steps} updates), "
          f"{time.time() - t_all:.0f} s in all:")
    print("| T | " + " | ".join(args.configs.split(",")) + " |")
    for T in (int(t) for t in args.T.split(",")):
        cells = []
        for name in args.configs.split(","):
            rs = table[T, name]
            best = min(r.error for r in rs)
            cells.append(f"{sum(r.success for r in rs)}/{len(rs)} (best error {best:.2f})")
        print(f"| {T} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
