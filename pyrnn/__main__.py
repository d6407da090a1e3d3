"""Command line: python -m pyrnn {info, gradflow, task, adding} (also installed as `pyrnn`)."""
import argparse
import math
import os
import sys
import time

import torch


def _cells():
    from pyrnn import _C
    return tuple(c["name"] for c in _C.cells())


CELLS = _cells()  # the registry's cells (csrc/cells/registry.h)


class Progress:
    """A one-line text progress bar on stderr (silent when stderr is not a terminal,
    unless forced)."""

    def __init__(self, total, label="", force=False, stream=sys.stderr):
        self.total, self.label, self.stream = max(total, 1), label, stream
        self.enabled = force or stream.isatty()
        self.n, self.t0, self.note = 0, time.time(), ""

    def update(self, k=1, note=None):
        self.n += k
        if note is not None:
            self.note = note
        if self.enabled:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            eta = (time.time() - self.t0) / max(frac, 1e-9) * (1 - frac)
            self.stream.write(f"\r{self.label} [{bar}] {self.n}/{self.total} "
                              f"eta {eta:5.0f}s {self.note}   ")
            self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def make_module(cell, input_size, hidden, **kw):
    from pyrnn import tasks
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {', '.join(CELLS)}, got {cell!r}")
    return tasks.make_module(cell, input_size, hidden, **kw)


def cmd_info(args):
    import pyrnn
    from pyrnn import _C
    print(f"pyrnn {pyrnn.__version__}  torch {torch.__version__}")
    print(f"backends: {', '.join(pyrnn.backends())}")
    print(f"CPU products: {_C.blas()}")
    print(f"CPU loops: {_C.cpu_capability()} (compiled: {_C.compiled_capabilities()}; "
          f"this CPU runs: {_C.supported_capabilities()}; PYRNN_CPU_CAPABILITY chooses)")
    return 0


def gradflow_run(cell, T, batch, input_size, hidden, seed, init="default", radius=0.0):
    """Norms of dLoss/dh_t for a loss on the last step only, at torch.nn's initialisation
    (or ``init`` and W_hh scaled to spectral radius ``radius``)."""
    from pyrnn import gradflow, init as pinit, tasks
    torch.manual_seed(seed)
    m = make_module(cell, input_size, hidden, record_grad_norms=True, record_gate_stats=True)
    tasks.initialise(m, init, radius, t_max=T)
    x = torch.randn(T, batch, input_size)
    out, _ = m(x)
    target = torch.randn(batch, hidden)
    loss = (out[-1] - target).pow(2).sum(1).mean()
    loss.backward()
    sigma = gradflow.largest_singular_value(m.weight_hh_l0, pinit.gates_of(m))
    return (m.grad_norms.hidden[0], m.weight_hh_l0.grad.norm().item(),
            m.gate_stats.factor.mean().item(), sigma, gradflow.activation_gamma(m))


def _bound(gamma):
    return "-" if gamma is None else f"{1 / gamma:.3g}"


def cmd_gradflow(args):
    if args.lstm_vs_rnn:
        return lstm_vs_rnn(args.seeds)
    from pyrnn import gradflow
    cells = args.cells.split(",")
    for c in cells:
        if c not in CELLS:
            raise SystemExit(f"--cells: expected a comma-separated list of {', '.join(CELLS)}, "
                             f"got {c!r}")
    Ts = [int(t) for t in args.T.split(",")]
    if args.sweep:
        return radius_sweep(args, cells, [float(r) for r in args.sweep.split(",")])
    results = {}
    bar = Progress(len(cells) * len(Ts), "gradflow", force=args.progress)
    for cell in cells:
        for T in Ts:
            results[cell, T] = gradflow_run(cell, T, args.batch, args.input_size, args.hidden,
                                            args.seed, args.init, args.radius)
            bar.update(note=f"{cell} T={T}")
    bar.close()
    print(f"loss on the last step; batch {args.batch}, input {args.input_size}, "
          f"hidden {args.hidden}, init {args.init}"
          + (f", W_hh blocks at spectral radius {args.radius}" if args.radius else "")
          + "; norms are batch means of ||dLoss/dh_t||; factor is the mean gate factor on "
          "the path back through a step (f, 1 - z, or the activation's derivative); "
          "sigma_max is W_hh's largest singular value (over gate blocks), 1/gamma the bound "
          "of Pascanu et al. (2013) for the Elman cells (sigma_max below it: vanishing "
          "guaranteed; above it: needed to explode)")
    print(f"{'cell':9} {'T':>4} {'|dL/dW_hh|':>11} {'|dL/dh_0|':>11} {'|dL/dh_T-1|':>11} "
          f"{'decay/step':>10} {'half-life':>9} {'factor':>7} {'sigma_max':>9} "
          f"{'1/gamma':>7}  flag")
    for (cell, T), (norms, w, factor, sigma, gamma) in results.items():
        s = gradflow.analyse(norms)
        c = gradflow.curve(norms)
        hl = "inf" if math.isinf(s.half_life) else f"{s.half_life:.1f}"
        print(f"{cell:9} {T:4d} {w:11.4g} {float(c[0]):11.4g} {float(c[-1]):11.4g} "
              f"{s.decay_rate:10.4f} {hl:>9} {factor:7.3f} {sigma:9.3f} {_bound(gamma):>7}"
              f"  {s.flag}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for cell in cells:
            path = os.path.join(args.out, f"gradflow_{cell}.png")
            gradflow.plot({f"T={T}": results[cell, T][0] for T in Ts}, path,
                          title=f"{cell}: gradient norm against time step (loss at T-1)")
            print(f"wrote {path}")
    return 0


def radius_sweep(args, cells, radii):
    """W_hh (each gate block) scaled to each spectral radius in turn, at the largest T."""
    from pyrnn import gradflow
    T = max(int(t) for t in args.T.split(","))
    bar = Progress(len(cells) * len(radii), "sweep", force=args.progress)
    print(f"radius sweep at T {T}: loss on the last step, batch {args.batch}, input "
          f"{args.input_size}, hidden {args.hidden}, init {args.init} then each block of "
          f"W_hh scaled to spectral radius rho; first/last = ||dL/dh_0|| / ||dL/dh_T-1||")
    print(f"{'cell':9} {'rho':>5} {'sigma_max':>9} {'1/gamma':>7} {'decay/step':>10} "
          f"{'first/last':>11} {'|dL/dW_hh|':>11} {'factor':>7}  flag")
    rows = []
    for cell in cells:
        for rho in radii:
            norms, w, factor, sigma, gamma = gradflow_run(
                cell, T, args.batch, args.input_size, args.hidden, args.seed, args.init, rho)
            s = gradflow.analyse(norms)
            rows.append(f"{cell:9} {rho:5.2f} {sigma:9.3f} {_bound(gamma):>7} "
                        f"{s.decay_rate:10.4f} {s.first_last_ratio:11.3g} {w:11.4g} "
                        f"{factor:7.3f}  {s.flag}")
            bar.update(note=f"{cell} rho={rho}")
    bar.close()
    print("\n".join(rows))
    return 0


def lstm_vs_rnn(seeds=1):
    """The experiment of issue 13, exactly: torch.nn-initialised RNN (tanh) and LSTM, input
    32, hidden 64, batch 1, T = 10, 50, 100, 200, a random target of size 64, loss
    ((output[-1] - target)**2).sum(); the norm of weight_hh_l0's gradient for both and
    their ratio, then with the LSTM's forget-gate bias at 1 (pyrnn.init.forget_bias_).
    Each run draws the weights, the input and the target from torch.manual_seed(seed);
    the same weights in torch.nn give the same gradient norms (the column torch.nn).
    Beside it, ||dLoss/dh_0||, the gradient that reaches the first step, which is what
    the claim is about."""
    from pyrnn import init as pinit
    import pyrnn
    Ts = (10, 50, 100, 200)

    def grads(m, x, target):
        m.zero_grad()
        out, _ = m(x)
        ((out[-1] - target) ** 2).sum().backward()
        dh0 = m.grad_norms.hidden[0, 0, 0].item() if getattr(m, "record_grad_norms",
                                                              False) else float("nan")
        return m.weight_hh_l0.grad.norm().item(), dh0

    def run(seed, T):
        torch.manual_seed(seed)
        rnn = pyrnn.RNN(32, 64, record_grad_norms=True)
        lstm = pyrnn.LSTM(32, 64, record_grad_norms=True)
        x, target = torch.randn(T, 1, 32), torch.randn(64)
        r = [grads(rnn, x, target), grads(lstm, x, target)]
        agree = 0.0
        for m, (g, _) in zip((rnn, lstm), r):
            ref = (torch.nn.RNN if m.mode == "RNN_TANH" else torch.nn.LSTM)(32, 64)
            ref.load_state_dict(m.state_dict())
            agree = max(agree, abs(grads(ref, x, target)[0] - g) / max(g, 1e-300))
        pinit.forget_bias_(lstm, 1.0)
        r.append(grads(lstm, x, target))
        return r, agree

    print("RNN (tanh) and LSTM, input 32, hidden 64, batch 1, torch.nn's default "
          "initialisation, loss ((output[-1] - target)**2).sum(). |dW_hh| = "
          "||grad weight_hh_l0||; |dh_0| = ||dLoss/dh_0||, the gradient at the first step; "
          "'fb1' = the same LSTM with forget-gate bias 1; 'torch.nn' = largest relative "
          "difference of torch.nn's |dW_hh| on the same weights")
    print(f"{'seed':>4} {'T':>4} {'RNN |dW_hh|':>11} {'LSTM':>9} {'LSTM/RNN':>9} {'fb1':>9} "
          f"{'fb1/RNN':>8} | {'RNN |dh_0|':>10} {'LSTM':>9} {'fb1':>9} {'torch.nn':>9}")
    ratios = {T: ([], [], [], [], []) for T in Ts}
    for seed in range(seeds):
        for T in Ts:
            ((g_rnn, h_rnn), (g_lstm, h_lstm), (g_fb, h_fb)), agree = run(seed, T)
            for k, v in enumerate((g_lstm / g_rnn, g_fb / g_rnn, h_rnn, h_lstm, h_fb)):
                ratios[T][k].append(v)
            if seed == 0:
                print(f"{seed:4d} {T:4d} {g_rnn:11.4g} {g_lstm:9.4g} {g_lstm / g_rnn:9.4g} "
                      f"{g_fb:9.4g} {g_fb / g_rnn:8.4g} | {h_rnn:10.3g} {h_lstm:9.3g} "
                      f"{h_fb:9.3g} {agree:9.1e}")
    if seeds > 1:
        print(f"medians over seeds 0..{seeds - 1} (min - max of the ratios):")
        for T in Ts:
            a, b, c, d, e = (torch.tensor(r, dtype=torch.float64) for r in ratios[T])
            print(f"  T {T:4d}  LSTM/RNN {a.median():.3g} ({a.min():.3g} - {a.max():.3g})  "
                  f"fb1/RNN {b.median():.3g} ({b.min():.3g} - {b.max():.3g})  |dh_0| RNN "
                  f"{c.median():.3g}  LSTM {d.median():.3g}  fb1 {e.median():.3g}")
    return 0


def cmd_task(args):
    from pyrnn import gradflow, tasks
    task = tasks.get(args.name, args.variant)
    desc = (f"{args.name} (T {args.T}): cell {args.cell}, hidden {args.hidden}, "
            f"{args.optimizer} lr {args.lr}"
            + (f" momentum {args.momentum}" if args.optimizer == "sgd" else "")
            + f", batch {args.batch}, init {args.init}"
            + (f" radius {args.radius}" if args.radius else "")
            + f", clip {args.clip or 'off'}, bptt_clip {args.bptt_clip or 'off'}, "
            f"penalty {args.penalty or 'off'}, seed {args.seed}; up to {args.steps} updates; "
            f"success: test {task.error_name} below {task.threshold:.3g}")
    print(desc, flush=True)
    bar = Progress(args.steps, args.name, force=args.progress)
    res = tasks.train(
        args.name, cell=args.cell, T=args.T, steps=args.steps, batch=args.batch,
        hidden=args.hidden, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        clip=args.clip, bptt_clip=args.bptt_clip, penalty=args.penalty, init=args.init,
        radius=args.radius, eval_every=args.eval_every, test_size=args.test_size,
        seed=args.seed, stop_on_success=not args.no_stop, variant=args.variant,
        progress=lambda step, note: bar.update(step - bar.n, note=note),
        log=None if bar.enabled else (lambda line: print(line, flush=True)))
    bar.close()
    verdict = "success" if res.success else ("diverged" if res.diverged else "no success")
    print(f"result: {verdict} after {res.steps} updates, test {task.error_name} "
          f"{res.error:.4g} (threshold {task.threshold:.3g}), {res.seconds:.1f} s")
    for name, n in res.flows.items():
        print(f"gradient flow at the {name}: {gradflow.analyse(n[0])}")
    if args.out:
        path = os.path.join(args.out, f"{args.name}_{args.cell}_T{args.T}_s{args.seed}.png")
        plot_curve(res, task, path, desc)
        print(f"wrote {path}")
    return 0


def plot_curve(res, task, path, title):
    """Learning curve (train loss and test error against updates) and the gradient flow at
    the start and at the end of training, side by side, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pyrnn import gradflow
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = [s for s, _, _ in res.curve]
    a1.plot(steps, [v for _, v, _ in res.curve], label="train loss (mean since last test)")
    a1.plot(steps, [e for _, _, e in res.curve], label=f"test {task.error_name}")
    a1.axhline(task.threshold, color="gray", ls="--", label="success threshold")
    a1.set_xlabel("update")
    a1.set_yscale("log")
    a1.set_title(f"{res.task}, T={res.T}", fontsize=10)
    a1.legend(fontsize=8)
    gradflow.plot({k: v for k, v in res.flows.items()}, ax=a2,
                  title="||dLoss/dh_t|| at the start and at the end of training")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_adding(args):
    """The adding problem as before: Le, Jaitly and Hinton's variant, Adam, global clipping
    at 1 (see README); an alias of `pyrnn task adding --variant sum --optimizer adam`."""
    args.name, args.variant, args.optimizer = "adding", "sum", "adam"
    args.clip, args.momentum, args.penalty, args.radius = args.grad_clip, 0.0, 0.0, 0.0
    args.test_size, args.no_stop = 1000, True
    return cmd_task(args)


def _train_options(p, defaults):
    """The options shared by `pyrnn task` and `pyrnn adding` (defaults differ)."""
    from pyrnn import tasks
    p.add_argument("--cell", default=defaults["cell"], choices=CELLS,
                   help="recurrent cell (default %(default)s)")
    p.add_argument("--T", type=int, default=defaults["T"],
                   help="the task's length parameter (default %(default)s)")
    p.add_argument("--steps", type=int, default=defaults["steps"],
                   help="most updates to make (default %(default)s)")
    p.add_argument("--batch", type=int, default=defaults["batch"],
                   help="sequences per update (default %(default)s)")
    p.add_argument("--hidden", type=int, default=defaults["hidden"],
                   help="hidden units (default %(default)s)")
    p.add_argument("--lr", type=float, default=defaults["lr"],
                   help="learning rate (default %(default)s)")
    p.add_argument("--bptt-clip", type=float, default=0.0,
                   help="clamp gate pre-activation gradients to [-c, c] inside BPTT "
                   "(0 = off, the default)")
    p.add_argument("--init", default="default", choices=tasks.INITS,
                   help="initialisation (pyrnn.init): torch.nn's default; identity (IRNN: "
                   "W_hh = I, zero biases); orthogonal W_hh; forget-bias (LSTM forget bias "
                   "1); chrono (LSTM, t_max = T)")
    p.add_argument("--eval-every", type=int, default=defaults["eval_every"],
                   help="updates between evaluations on the test set (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the training data and the test set "
                   "(default %(default)s)")
    p.add_argument("--out", default=defaults["out"],
                   help="directory for the learning-curve PNG ('' = none; default "
                   "%(default)s)")
    p.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal")


def build_parser():
    from pyrnn import tasks
    ap = argparse.ArgumentParser(prog="pyrnn", description="pyrnn command line")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version and compiled backends")

    g = sub.add_parser("gradflow", help="how gradients flow back through time, per cell and T")
    g.add_argument("--cells", default=",".join(CELLS),
                   help="comma-separated cells out of " + ", ".join(CELLS) +
                   " (default all)")
    g.add_argument("--T", default="10,50,100,200", help="comma-separated sequence lengths "
                   "(default %(default)s)")
    g.add_argument("--batch", type=int, default=32, help="batch size (default %(default)s)")
    g.add_argument("--input-size", type=int, default=16,
                   help="input features (default %(default)s)")
    g.add_argument("--hidden", type=int, default=128, help="hidden units (default %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, inputs and target (default %(default)s)")
    g.add_argument("--out", default=None, help="directory for one PNG per cell (default none)")
    g.add_argument("--progress", action="store_true", help="show the progress bar even when "
                   "stderr is not a terminal")
    g.add_argument("--init", default="default", choices=tasks.INITS,
                   help="initialisation (pyrnn.init) before any --radius: torch.nn's "
                   "default, identity, orthogonal, forget-bias (LSTM, 1), chrono (LSTM, "
                   "t_max = T)")
    g.add_argument("--radius", type=float, default=0.0,
                   help="scale each gate block of W_hh to this spectral radius (0 = leave it)")
    g.add_argument("--sweep", default="",
                   help="comma-separated spectral radii: run each cell at the largest --T "
                   "with W_hh scaled to each, and print vanishing / explosion against the "
                   "bound 1/gamma")
    g.add_argument("--lstm-vs-rnn", action="store_true",
                   help="run the fixed experiment of the README instead (RNN-tanh against "
                   "LSTM, input 32, hidden 64, batch 1, T = 10, 50, 100, 200)")
    g.add_argument("--seeds", type=int, default=1,
                   help="with --lstm-vs-rnn: seeds 0 .. N-1, and the medians (default 1)")

    t = sub.add_parser("task", help="train a cell on one of the pathological problems "
                       "(Hochreiter and Schmidhuber 1997): " + ", ".join(tasks.TASKS),
                       description="Train a cell on a long-term-dependency problem; the "
                       "definitions and success criteria are in pyrnn.tasks (and the "
                       "README). Plain SGD with momentum by default.")
    t.add_argument("name", choices=tasks.TASKS, help="the problem")
    _train_options(t, dict(cell="rnn_tanh", T=50, steps=5000, batch=20, hidden=50, lr=0.01,
                           eval_every=100, out="task_out"))
    t.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                   help="sgd (with --momentum, the default) or adam")
    t.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum (default %(default)s)")
    t.add_argument("--clip", type=float, default=0.0,
                   help="rescale the whole gradient to this norm when it is larger "
                   "(Pascanu et al. 2013; 0 = off, the default)")
    t.add_argument("--penalty", type=float, default=0.0,
                   help="the vanishing-gradient regulariser's weight lambda "
                   "(vanishing_penalty; Elman cells; 0 = off, the default)")
    t.add_argument("--radius", type=float, default=0.0,
                   help="after --init, scale each block of W_hh to this spectral radius "
                   "(0 = leave it)")
    t.add_argument("--variant", default="mean", choices=("mean", "sum"),
                   help="adding only: mean (Hochreiter and Schmidhuber; Martens and "
                   "Sutskever; the default) or sum (Le, Jaitly and Hinton)")
    t.add_argument("--test-size", type=int, default=1000,
                   help="sequences in the test set (default %(default)s)")
    t.add_argument("--no-stop", action="store_true",
                   help="train all --steps updates even after success")

    a = sub.add_parser("adding", help="the adding problem with Adam as in the README "
                       "(alias of `task adding --variant sum --optimizer adam`)")
    _train_options(a, dict(cell="lstm", T=100, steps=10000, batch=64, hidden=64, lr=3e-3,
                           eval_every=250, out="adding_out"))
    a.add_argument("--grad-clip", type=float, default=1.0,
                   help="global gradient-norm clipping before each update (0 = off; "
                   "default %(default)s)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    return {"info": cmd_info, "gradflow": cmd_gradflow, "task": cmd_task,
            "adding": cmd_adding}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
