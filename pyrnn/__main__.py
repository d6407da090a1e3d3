"""Command line: python -m pyrnn {info, gradflow, adding} (also installed as `pyrnn`)."""
import argparse
import math
import os
import sys
import time

import torch

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


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
    import pyrnn
    if cell in ("rnn_tanh", "rnn_relu"):
        return pyrnn.RNN(input_size, hidden, nonlinearity=cell[4:], **kw)
    if cell == "lstm":
        return pyrnn.LSTM(input_size, hidden, **kw)
    if cell == "gru":
        return pyrnn.GRU(input_size, hidden, **kw)
    raise ValueError(f"cell: expected one of {', '.join(CELLS)}, got {cell!r}")


def cmd_info(args):
    import pyrnn
    from pyrnn import _C
    print(f"pyrnn {pyrnn.__version__}  torch {torch.__version__}")
    print(f"backends: {', '.join(pyrnn.backends())}")
    print(f"CPU products: {_C.blas()}")
    return 0


def gradflow_run(cell, T, batch, input_size, hidden, seed):
    """Norms of dLoss/dh_t for a loss on the last step only, at torch.nn's initialisation."""
    torch.manual_seed(seed)
    m = make_module(cell, input_size, hidden, record_grad_norms=True, record_gate_stats=True)
    x = torch.randn(T, batch, input_size)
    out, _ = m(x)
    target = torch.randn(batch, hidden)
    loss = (out[-1] - target).pow(2).sum(1).mean()
    loss.backward()
    return (m.grad_norms.hidden[0], m.weight_hh_l0.grad.norm().item(),
            m.gate_stats.factor.mean().item())


def cmd_gradflow(args):
    from pyrnn import gradflow
    cells = args.cells.split(",")
    Ts = [int(t) for t in args.T.split(",")]
    results = {}
    bar = Progress(len(cells) * len(Ts), "gradflow", force=args.progress)
    for cell in cells:
        for T in Ts:
            results[cell, T] = gradflow_run(cell, T, args.batch, args.input_size, args.hidden,
                                            args.seed)
            bar.update(note=f"{cell} T={T}")
    bar.close()
    print(f"loss on the last step; batch {args.batch}, input {args.input_size}, "
          f"hidden {args.hidden}; norms are batch means of ||dLoss/dh_t||; factor is the "
          f"mean gate factor on the path back through a step (f, 1 - z, or the "
          f"activation's derivative)")
    print(f"{'cell':9} {'T':>4} {'|dL/dW_hh|':>11} {'|dL/dh_0|':>11} {'|dL/dh_T-1|':>11} "
          f"{'decay/step':>10} {'half-life':>9} {'factor':>7}  flag")
    for (cell, T), (norms, w, factor) in results.items():
        s = gradflow.analyse(norms)
        c = gradflow.curve(norms)
        hl = "inf" if math.isinf(s.half_life) else f"{s.half_life:.1f}"
        print(f"{cell:9} {T:4d} {w:11.4g} {float(c[0]):11.4g} {float(c[-1]):11.4g} "
              f"{s.decay_rate:10.4f} {hl:>9} {factor:7.3f}  {s.flag}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for cell in cells:
            path = os.path.join(args.out, f"gradflow_{cell}.png")
            gradflow.plot({f"T={T}": results[cell, T][0] for T in Ts}, path,
                          title=f"{cell}: gradient norm against time step (loss at T-1)")
            print(f"wrote {path}")
    return 0


def adding_batch(T, batch, gen):
    """The adding problem: channel 0 holds uniform [0, 1) values, channel 1 marks two
    positions (one in each half); the target is the sum of the two marked values."""
    values = torch.rand(T, batch, generator=gen)
    marks = torch.zeros(T, batch)
    half = max(T // 2, 1)
    first = torch.randint(0, half, (batch,), generator=gen)
    second = torch.randint(half, T, (batch,), generator=gen) if T > 1 else first
    idx = torch.arange(batch)
    marks[first, idx] = 1.0
    marks[second, idx] = 1.0
    target = (values * marks).sum(0)
    return torch.stack([values, marks], 2), target


def cmd_adding(args):
    import pyrnn
    from pyrnn import gradflow
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rnn = make_module(args.cell, 2, args.hidden, bptt_clip=args.bptt_clip,
                      record_grad_norms=True)
    if args.init == "identity":  # Le, Jaitly and Hinton 2015: W_hh = I, zero biases
        with torch.no_grad():
            for name, p in rnn.named_parameters():
                if name.startswith("weight_hh"):
                    G = p.shape[0] // p.shape[1]
                    p.copy_(torch.eye(p.shape[1]).repeat(G, 1))
                elif name.startswith("bias"):
                    p.zero_()
    head = torch.nn.Linear(args.hidden, 1)
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    test_x, test_y = adding_batch(args.T, 1000, torch.Generator().manual_seed(args.seed + 1))
    baseline = ((test_y - 1.0) ** 2).mean().item()
    curve, flows = [], {}
    print(f"adding problem: cell {args.cell} ({args.init} init), T {args.T}, hidden {args.hidden}, lr {args.lr}, "
          f"bptt_clip {args.bptt_clip or 'off'}, {args.steps} steps of batch {args.batch}; "
          f"baseline MSE (always 1) {baseline:.3f}")
    bar = Progress(args.steps, "adding", force=args.progress)
    for step in range(1, args.steps + 1):
        x, y = adding_batch(args.T, args.batch, gen)
        out, _ = rnn(x)
        loss = torch.nn.functional.mse_loss(head(out[-1]).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        if step == 1:
            flows["start"] = rnn.grad_norms.hidden[0].clone()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                mse = torch.nn.functional.mse_loss(head(rnn(test_x)[0][-1]).squeeze(1),
                                                   test_y).item()
            curve.append((step, mse))
            bar.update(0, note=f"test MSE {mse:.4f}")
            if not bar.enabled:
                print(f"step {step:6d}  train {loss.item():.4f}  test MSE {mse:.4f}", flush=True)
        bar.update()
    flows["end"] = rnn.grad_norms.hidden[0].clone()
    bar.close()
    final = curve[-1][1]
    verdict = "learned" if final < 0.1 * baseline else "did not learn"
    print(f"final test MSE {final:.4f} against baseline {baseline:.3f}: {verdict}")
    for name, n in flows.items():
        print(f"gradient flow at the {name}: {gradflow.analyse(n)}")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        os.makedirs(args.out, exist_ok=True)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.plot([s for s, _ in curve], [v for _, v in curve], label=f"{args.cell} test MSE")
        a1.axhline(baseline, color="gray", ls="--", label="baseline (always 1)")
        a1.set_xlabel("training step")
        a1.set_ylabel("MSE")
        a1.set_yscale("log")
        a1.set_title(f"adding problem, T={args.T}")
        a1.legend()
        gradflow.plot({"start of training": flows["start"], "end of training": flows["end"]},
                      ax=a2, title="||dLoss/dh_t|| (loss at the last step)")
        fig.tight_layout()
        path = os.path.join(args.out, f"adding_{args.cell}_T{args.T}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print(f"wrote {path}")
    return 0


def build_parser():
    ap = argparse.ArgumentParser(prog="pyrnn", description="pyrnn command line")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version and compiled backends")

    g = sub.add_parser("gradflow", help="how gradients flow back through time, per cell and T")
    g.add_argument("--cells", default=",".join(CELLS))
    g.add_argument("--T", default="10,50,100,200", help="comma-separated sequence lengths")
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--input-size", type=int, default=16)
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="directory for PNG plots")
    g.add_argument("--progress", action="store_true", help="show the progress bar even when "
                   "stderr is not a terminal")

    a = sub.add_parser("adding", help="train a cell on the adding problem")
    a.add_argument("--cell", default="lstm", choices=CELLS)
    a.add_argument("--T", type=int, default=100)
    a.add_argument("--steps", type=int, default=10000)
    a.add_argument("--batch", type=int, default=64)
    a.add_argument("--hidden", type=int, default=64)
    a.add_argument("--lr", type=float, default=3e-3)
    a.add_argument("--bptt-clip", type=float, default=0.0,
                   help="clamp gate pre-activation gradients to [-c, c] inside BPTT (0 = off)")
    a.add_argument("--init", default="default", choices=("default", "identity"),
                   help="recurrent weights: torch.nn's default, or the identity (IRNN)")
    a.add_argument("--grad-clip", type=float, default=1.0,
                   help="global gradient-norm clipping before each update (0 = off)")
    a.add_argument("--eval-every", type=int, default=250)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default="adding_out", help="directory for the PNG ('' = none)")
    a.add_argument("--progress", action="store_true")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    return {"info": cmd_info, "gradflow": cmd_gradflow, "adding": cmd_adding}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
