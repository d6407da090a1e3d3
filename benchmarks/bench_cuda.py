"""pyrnn against torch.nn (cuDNN) on a GPU, side by side in one process.

Shapes (input_size = hidden_size): T=1024 B=16 H=768, T=100 B=64 H=1024, T=512 B=4 H=256;
float32, bfloat16 and float16; LSTM, GRU and RNN-tanh; forward and forward + backward.
Timing with CUDA events, A and B interleaved after a warm-up, medians over --reps;
peak memory per side (torch.cuda.max_memory_allocated over one forward + backward).
`ratio` is pyrnn / torch.nn (lower is better).

    python benchmarks/bench_cuda.py [--reps 21] [--cells lstm,gru] [--dtypes float32]

Needs a GPU and pyrnn built with CUDA (PYRNN_CUDA=1); exits with a message otherwise.
"""
import argparse
import statistics
import sys

import torch

import pyrnn

SHAPES = {"S1": (1024, 16, 768), "S2": (100, 64, 1024), "S3": (512, 4, 256)}
CELLS = {"lstm": (pyrnn.LSTM, torch.nn.LSTM), "gru": (pyrnn.GRU, torch.nn.GRU),
         "rnn_tanh": (pyrnn.RNN, torch.nn.RNN)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    if not torch.cuda.is_available() or "cuda" not in pyrnn.backends():
        sys.exit(f"needs a GPU and pyrnn built with CUDA (GPU visible: "
                 f"{torch.cuda.is_available()}, pyrnn backends: {pyrnn.backends()})")
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}, cuDNN "
          f"{torch.backends.cudnn.version()}, {args.reps} reps, medians")
    print(f"{'cell':9}{'shape':6}{'dtype':9}{'pass':8}{'torch.nn ms':>12}{'pyrnn ms':>10}"
          f"{'ratio':>7}{'peak MB nn':>12}{'pyrnn':>8}")
    for cell in args.cells.split(","):
        ours_cls, ref_cls = CELLS[cell]
        for sname in args.shapes.split(","):
            T, B, H = SHAPES[sname]
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                torch.manual_seed(0)
                ref = ref_cls(H, H).to(dev, dtype)
                ours = ours_cls(H, H).to(dev, dtype)
                ours.load_state_dict(ref.state_dict())
                x = torch.randn(T, B, H, device=dev, dtype=dtype, requires_grad=True)
                dy = torch.randn(T, B, H, device=dev, dtype=dtype)

                def fwd(m):
                    with torch.no_grad():
                        m(x)

                def fwd_bwd(m):
                    out, _ = m(x)
                    out.backward(dy)

                for pname, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    for _ in range(args.warmup):
                        f(ref)
                        f(ours)
                    a, b = [], []
                    for _ in range(args.reps):  # interleaved: A B A B
                        a.append(time_ms(lambda: f(ref)))
                        b.append(time_ms(lambda: f(ours)))
                    ma, mb = statistics.median(a), statistics.median(b)
                    mem = ""
                    if pname == "fwd+bwd":
                        mem = f"{peak_mb(lambda: f(ref)):12.1f}{peak_mb(lambda: f(ours)):8.1f}"
                    print(f"{cell:9}{sname:6}{dname:9}{pname:8}{ma:12.2f}{mb:10.2f}"
                          f"{mb / ma:7.2f}{mem}", flush=True)


if __name__ == "__main__":
    main()
