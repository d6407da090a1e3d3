"""pyrnn.LayerNormLSTM against its plain-PyTorch formulation (pyrnn.reference, the per-step
loop with torch.nn.functional.layer_norm) run eagerly and through torch.compile, on the CPU.

float32, input_size = hidden_size, one layer, at the shapes of bench_cpu.py (S1: T=100,
B=32, H=128; S2: T=100, B=32, H=512; S3: T=500, B=8, H=256; S4: T=100, B=1, H=64). For
each shape it times the forward under no_grad and forward + backward, pyrnn interleaved
with each competitor in one process (A B A B ...), and prints the median times and the
median over the pairs of the ratio pyrnn / competitor (lower is better). The compiled
reference runs its step through torch.compile (see Reference), compiled before the
timing (the compile time is printed, not counted); for the forward also the whole
sequence as one compiled graph. All three give the same results (tests/test_ln_lstm.py).

    python benchmarks/bench_ln_lstm.py                 # S1, S2, S4
    python benchmarks/bench_ln_lstm.py --shapes S1 --quick
"""
import argparse
import sys
import time

import torch

import pyrnn
from pyrnn import reference

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_cpu import SHAPES, bench_pair  # noqa: E402


class Reference(torch.nn.Module):
    """The reference formulation on the parameters of a pyrnn.LayerNormLSTM. compiled:
    the step (the recurrent product, its norm and the cell: reference.STEPS) runs through
    torch.compile, called once per time step; compiling the whole sequence instead unrolls
    its T steps into one graph, which at T = 100 took minutes to compile for the backward."""

    def __init__(self, m, compiled=False):
        super().__init__()
        self.m = m
        self.step = torch.compile(self._step, dynamic=False) if compiled else self._step

    @staticmethod
    def _step(xg, h, c, w_hh, b_hh, cw, eps):
        GH = w_hh.shape[0]
        hg = torch.nn.functional.layer_norm(h @ w_hh.t(), (GH,), cw[GH:2 * GH], b_hh, eps)
        h, c, _ = reference.STEPS["ln_lstm"](xg, hg, h, c, [eps], lambda a: a, cw)
        return h, c

    def forward(self, x):
        m = self.m
        B, H = x.shape[1], m.hidden_size
        GH = 4 * H
        w_ih, w_hh, b_ih, b_hh, _ = m._weights(0, 0)
        cw = m._cell_weight(0, 0)
        xg = torch.nn.functional.layer_norm(x @ w_ih.t(), (GH,), cw[:GH], b_ih, m.eps)
        h = c = x.new_zeros(B, H)
        out = []
        for t in range(x.shape[0]):
            h, c = self.step(xg[t], h, c, w_hh, b_hh, cw, m.eps)
            out.append(h)
        return torch.stack(out), h, c


def fwd(f, x):
    def run():
        with torch.no_grad():
            return f(x)
    return run


def fwdbwd(f, x, g, params):
    def run():
        for p in params:
            p.grad = None
        y = f(x)[0]
        y.backward(g)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--shapes", default="S1,S2,S4")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 11)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {reps} reps, medians")
    print(f"{'shape':5} {'pass':8} {'pyrnn ms':>9} {'eager ms':>9} {'ratio':>6} "
          f"{'step compiled ms':>16} {'ratio':>6} {'compile s':>9} "
          f"{'whole compiled ms':>17} {'ratio':>6} {'compile s':>9}")
    for sname in args.shapes.split(","):
        T, B, H = SHAPES[sname]
        torch.manual_seed(0)
        m = pyrnn.LayerNormLSTM(H, H)
        ref = Reference(m)
        compiled = Reference(m, compiled=True)
        x, g = torch.randn(T, B, H), torch.randn(T, B, H)
        params = list(m.parameters())
        for pas in args.passes.split(","):
            if pas == "fwd":
                ours, eager, comp = fwd(m, x), fwd(ref, x), fwd(compiled, x)
            else:
                ours, eager, comp = (fwdbwd(m, x, g, params), fwdbwd(ref, x, g, params),
                                     fwdbwd(compiled, x, g, params))
            t0 = time.perf_counter()
            comp()  # compiles
            compile_s = time.perf_counter() - t0
            # bench_pair(a, b) returns the medians of a and b and of the ratios b / a
            te, _, r_eager = bench_pair(eager, ours, max(3, reps // 3))
            tc, tp, r_comp = bench_pair(comp, ours, reps)
            line = (f"{sname:5} {pas:8} {tp*1e3:9.2f} {te*1e3:9.2f} {r_eager:6.2f} "
                    f"{tc*1e3:16.2f} {r_comp:6.2f} {compile_s:9.1f}")
            if pas == "fwd":  # the whole sequence as one compiled graph (forward only)
                whole = fwd(torch.compile(ref, dynamic=False), x)
                t0 = time.perf_counter()
                whole()
                whole_s = time.perf_counter() - t0
                tw, _, r_whole = bench_pair(whole, ours, reps)
                line += f" {tw*1e3:17.2f} {r_whole:6.2f} {whole_s:9.1f}"
            print(line, flush=True)
            torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
