"""Temporal order with a tanh RNN: success over seeds, with and without gradient clipping
and the vanishing-gradient regulariser (Pascanu, Mikolov and Bengio 2013, sec. 4).

Each run is `pyrnn task temporal-order` with the given settings (plain SGD with momentum,
50 hidden units, batch 20); it stops at the first evaluation with a test error below 1%.
Prints one line per run and a table of successes per T and configuration, with the range
of the final test error and of the decay per step of ||dLoss/dh_t|| after the last update;
``--json`` also writes every run's outcome and learning curve.
Usage: OMP_NUM_THREADS=1 python benchmarks/temporal_order.py --T 50,100,200 --seeds 5 --steps 10000
"""
import argparse
import json
import time

import torch

from pyrnn import gradflow, tasks

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
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    ap.add_argument("--batch", type=int, default=20, help="sequences per update")
    ap.add_argument("--hidden", type=int, default=50, help="hidden units")
    ap.add_argument("--clip", type=float, default=1.0, help="clipping threshold when on")
    ap.add_argument("--penalty", type=float, default=2.0, help="lambda when on")
    ap.add_argument("--eval-every", type=int, default=100, help="updates between tests")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", default="", help="write every run's outcome to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table, runs = {}, []
    t_all = time.time()
    for T in (int(t) for t in args.T.split(",")):
        for name in args.configs.split(","):
            cfg = dict(CONFIGS[name])
            cfg["clip"] = args.clip if cfg["clip"] else 0.0
            cfg["penalty"] = args.penalty if cfg["penalty"] else 0.0
            for seed in range(args.seeds):
                r = tasks.train("temporal-order", cell="rnn_tanh", T=T, steps=args.steps,
                                batch=args.batch, hidden=args.hidden, lr=args.lr,
                                momentum=args.momentum, eval_every=args.eval_every, seed=seed,
                                **cfg)
                end = gradflow.analyse(r.flows["end"][0])
                table.setdefault((T, name), []).append((r, end.decay_rate))
                runs.append(dict(T=T, config=name, seed=seed, success=r.success, steps=r.steps,
                                 error=r.error, end_decay=end.decay_rate, seconds=r.seconds,
                                 curve=r.curve))
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(dict(settings=vars(args), runs=runs), f, indent=1)
                print(f"T {T:4d} {name:13} seed {seed}: {'success' if r.success else 'no':7} "
                      f"after {r.steps:5d} updates, test error {r.error:.3f}, end decay "
                      f"{end.decay_rate:.3f}/step, {r.seconds:.1f} s", flush=True)
    print(f"\nsuccesses (test error < 1% within {args.steps} updates), "
          f"{time.time() - t_all:.0f} s in all; final test error and end decay per step:")
    print("| T | " + " | ".join(args.configs.split(",")) + " |")
    print("| --- |" + " --- |" * len(args.configs.split(",")))
    for T in (int(t) for t in args.T.split(",")):
        cells = []
        for name in args.configs.split(","):
            rs = table[T, name]
            err = [r.error for r, _ in rs]
            dec = [d for _, d in rs]
            won = [r.steps for r, _ in rs if r.success]
            at = f" (at {', '.join(map(str, won))})" if won else ""
            cells.append(f"{len(won)}/{len(rs)}{at}; error {min(err):.2f} - {max(err):.2f}; "
                         f"decay {min(dec):.2f} - {max(dec):.2f}")
        print(f"| {T} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
