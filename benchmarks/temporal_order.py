"""Temporal order with a tanh RNN: success over seeds, with and without gradient clipping
and the vanishing-gradient regulariser (Pascanu, Mikolov and Bengio 2013, sec. 4).

Each run is `pyrnn task temporal-order` with the given settings (plain SGD with momentum,
50 hidden units, batch 20); it stops at the first evaluation with a test error below 1%,
or when the training loss becomes inf or NaN (diverged). Prints one line per run and a
table of successes per T and configuration, with the updates each success took, the
diverged runs, the range of the final test error and of the decay per step of
||dLoss/dh_t|| after the last update (over the runs that did not diverge). ``--json``
writes every run's outcome and learning curve; ``--table-from`` prints the table of the
runs in such files (the latest run of each T, configuration and seed).
Usage: OMP_NUM_THREADS=1 python benchmarks/temporal_order.py --T 50,100,200 --seeds 5 --steps 10000
"""
import argparse
import json
import math
import time

import torch

from pyrnn import gradflow, tasks

CONFIGS = {"plain": dict(clip=0.0, penalty=0.0), "clip": dict(clip=1.0, penalty=0.0),
           "penalty": dict(clip=0.0, penalty=2.0), "clip+penalty": dict(clip=1.0, penalty=2.0)}


def diverged(run):
    """Whether a run diverged (also for files written before ``diverged`` was recorded:
    a non-finite training loss in its curve)."""
    return bool(run.get("diverged")) or any(not math.isfinite(c[1]) for c in run["curve"])


def print_table(runs, steps, seconds):
    Ts = sorted({r["T"] for r in runs})
    names = [n for n in CONFIGS if any(r["config"] == n for r in runs)]
    print(f"\nsuccesses (test error < 1% within {steps} updates), {seconds:.0f} s in all; "
          "updates at success; diverged runs; final test error and end decay per step:")
    print("| T | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for T in Ts:
        cells = []
        for name in names:
            rs = [r for r in runs if r["T"] == T and r["config"] == name]
            won = [r["steps"] for r in rs if r["success"]]
            div = [r for r in rs if diverged(r)]
            live = [r for r in rs if not diverged(r)]
            cell = f"{len(won)}/{len(rs)}"
            if won:
                cell += f" (at {', '.join(map(str, won))})"
            if div:
                cell += f"; {len(div)} diverged"
            if live:
                err = [r["error"] for r in live]
                dec = [r["end_decay"] for r in live]
                cell += (f"; error {min(err):.2f} - {max(err):.2f}; "
                         f"decay {min(dec):.2f} - {max(dec):.2f}")
            cells.append(cell)
        print(f"| {T} | " + " | ".join(cells) + " |")


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
    ap.add_argument("--table-from", default="", help="print the table of the runs in these "
                    "files (comma-separated, a later file's run of the same T, configuration "
                    "and seed replaces an earlier one) written by --json, and run nothing")
    args = ap.parse_args()
    if args.table_from:
        latest, steps = {}, set()
        for path in args.table_from.split(","):
            with open(path) as f:
                saved = json.load(f)
            latest.update({(r["T"], r["config"], r["seed"]): r for r in saved["runs"]})
            steps.add(saved["settings"]["steps"])
        runs = list(latest.values())
        print_table(runs, "/".join(map(str, sorted(steps))), sum(r["seconds"] for r in runs))
        return
    torch.set_num_threads(args.threads)
    runs = []
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
                runs.append(dict(T=T, config=name, seed=seed, success=r.success,
                                 diverged=r.diverged, steps=r.steps, error=r.error,
                                 end_decay=end.decay_rate, seconds=r.seconds, curve=r.curve))
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(dict(settings=vars(args), runs=runs), f, indent=1)
                verdict = "success" if r.success else ("diverged" if r.diverged else "no")
                print(f"T {T:4d} {name:13} seed {seed}: {verdict:8} after {r.steps:5d} updates, "
                      f"test error {r.error:.3f}, end decay {end.decay_rate:.3f}/step, "
                      f"{r.seconds:.1f} s", flush=True)
    print_table(runs, args.steps, time.time() - t_all)


if __name__ == "__main__":
    main()
