"""pyrnn against what a user might pick instead, on the CPU: torch.nn, ONNX Runtime and
OpenVINO for inference, JAX for training. The runtimes that are not installed are left
out (ONNX Runtime comes with requirements.txt; `pip install openvino jax` adds the others).

A second table times bfloat16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`,
the backward outside it, as torch's documentation has it): pyrnn against torch.nn for
LSTM and GRU at S1-S3, where both run their products in bfloat16 (pyrnn: operands
rounded to bfloat16, sums in float32; see the README, "Precision"). Where torch.nn
raises under autocast (its oneDNN LSTM on a CPU without bfloat16 instructions) the row
says so, and torch.nn is timed once more with oneDNN switched off, its other CPU path.

Inference: each side runs the same float32 weights, input_size = hidden_size, one layer;
ONNX Runtime and OpenVINO run the model torch.onnx exports from torch.nn (its RNN, LSTM
and GRU operators), OpenVINO in float32 and in its default precision for this CPU.
Training (forward + backward of sum(output * g), gradients of the weights): JAX runs a jit-compiled lax.scan of the
same cell with the same weights. All sides of a row run in rounds, one call each per
round in turn, in one process; the table gives median times and the median over rounds
of the ratio pyrnn / that side (lower is better for pyrnn).

    python benchmarks/bench_runtimes.py            # S1-S4, every cell
    python benchmarks/bench_runtimes.py --quick    # fewer rounds
    python benchmarks/bench_runtimes.py --autocast-only --shapes S1,S2,S3
"""
import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import pyrnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import SHAPES, make_pair, run_fwd, run_fwdbwd  # noqa: E402


def cpuinfo(field):
    """The value of the first /proc/cpuinfo line for field, or None."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model():
    return cpuinfo("model name") or platform.processor() or "unknown CPU"


def rounds(fns, n, warmup_s=0.3, settle_s=0.005):
    """Runs every fn once per round, n rounds after a warm-up; returns the per-round times.
    Each timed call comes settle_s after the previous one ends, untimed, so that the
    worker threads of the runtime that ran before (which spin a while before they sleep)
    are idle when the next one starts."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(n):
        for k, f in fns.items():
            time.sleep(settle_s)
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def onnx_bytes(module, x):
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, dynamo=False, input_names=["x"],
                      output_names=["y", "h"] if not isinstance(module, torch.nn.LSTM)
                      else ["y", "h", "c"])
    return buf.getvalue()


def ort_runner(model, x, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Its workers otherwise spin after each run and take a core from whatever runs next
    # in the rounds (measured: pyrnn's LSTM at S1 1.5x - 2.6x slower after an ONNX Runtime
    # call than after a torch.nn one).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def openvino_runner(model, x, threads, precision):
    import openvino as ov
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": threads}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(model=model), "CPU", cfg)
    request = compiled.create_infer_request()
    feed = {0: x.numpy()}
    return lambda: request.infer(feed)


def openvino_precision():
    import openvino as ov
    core = ov.Core()
    return core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def jax_runner(cell, m, x, g):
    """Forward + backward of sum(output * g) w.r.t. the weights, jit-compiled."""
    import jax
    import jax.numpy as jnp
    w = {k: jnp.asarray(v.detach().numpy()) for k, v in m.state_dict().items()}
    H = m.hidden_size

    def step(params, h, xt):
        if cell == "lstm":
            hh, cc = h
            z = xt @ params["weight_ih_l0"].T + params["bias_ih_l0"] \
                + hh @ params["weight_hh_l0"].T + params["bias_hh_l0"]
            i, f, gg, o = (z[:, k * H:(k + 1) * H] for k in range(4))
            c2 = jax.nn.sigmoid(f) * cc + jax.nn.sigmoid(i) * jnp.tanh(gg)
            h2 = jax.nn.sigmoid(o) * jnp.tanh(c2)
            return (h2, c2), h2
        if cell == "gru":
            gi = xt @ params["weight_ih_l0"].T + params["bias_ih_l0"]
            gh = h @ params["weight_hh_l0"].T + params["bias_hh_l0"]
            r = jax.nn.sigmoid(gi[:, :H] + gh[:, :H])
            z = jax.nn.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
            n = jnp.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            h2 = (1 - z) * n + z * h
            return h2, h2
        h2 = jnp.tanh(xt @ params["weight_ih_l0"].T + params["bias_ih_l0"]
                      + h @ params["weight_hh_l0"].T + params["bias_hh_l0"])
        return h2, h2

    def loss(params, xs, gs):
        B = xs.shape[1]
        h0 = jnp.zeros((B, H), xs.dtype)
        init = (h0, h0) if cell == "lstm" else h0
        _, ys = jax.lax.scan(lambda h, xt: step(params, h, xt), init, xs)
        return jnp.sum(ys * gs)

    grad = jax.jit(jax.grad(loss))
    xs, gs = jnp.asarray(x.numpy()), jnp.asarray(g.numpy())

    def f():
        jax.block_until_ready(grad(w, xs, gs))
    return f


@contextlib.contextmanager
def onednn(enabled):
    """torch's oneDNN paths on or off (nothing else of torch.backends.mkldnn changed)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def autocast_fwd(m, x, with_onednn=True):
    def f():
        with torch.no_grad(), onednn(with_onednn), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)
    return f


def autocast_fwdbwd(m, x, g, with_onednn=True):
    params = list(m.parameters())

    def f():
        for p in params:
            p.grad = None
        with onednn(with_onednn):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, _ = m(x)
            y.backward(g.to(y.dtype))
    return f


def autocast_table(cells, shapes, n):
    """pyrnn / torch.nn, both under bfloat16 autocast; where torch.nn raises, a row says so
    and torch.nn runs again with oneDNN off."""
    print("\nbfloat16 autocast, torch.autocast('cpu', dtype=torch.bfloat16):")
    print(f"{'cell':8} {'shape':5} {'pass':9} {'side':18} {'ms':>9} {'pyrnn ms':>9} "
          f"{'pyrnn/side':>10}")
    for cell in cells:
        for sname in shapes:
            ref, ours, x, g = make_pair(cell, *SHAPES[sname])
            for pas, make in (("inference", lambda m, **k: autocast_fwd(m, x, **k)),
                              ("training", lambda m, **k: autocast_fwdbwd(m, x, g, **k))):
                sides = {"pyrnn": make(ours), "torch.nn": make(ref)}
                try:
                    sides["torch.nn"]()
                except RuntimeError as e:
                    print(f"{cell:8} {sname:5} {pas:9} torch.nn raises: "
                          f"{str(e).splitlines()[0][:80]}")
                    sides["torch.nn"] = make(ref, with_onednn=False)
                    sides["torch.nn, oneDNN off"] = sides.pop("torch.nn")
                report(cell, sname, pas, rounds(sides, n))


def available(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="7 rounds instead of 21")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per row")
    ap.add_argument("--cells", default="rnn_tanh,lstm,gru", help="comma-separated cells")
    ap.add_argument("--shapes", default="S1,S2,S3,S4", help="comma-separated of S1-S4")
    ap.add_argument("--no-autocast", action="store_true", help="leave out the autocast table")
    ap.add_argument("--autocast-only", action="store_true", help="only the autocast table")
    ap.add_argument("--settle", type=float, default=0.005,
                    help="seconds between one timed call and the next (default 0.005: each "
                    "call finds the other sides' threads idle, and its own code and data may have "
                    "left the caches; 0: each call right after the last side's)")
    args = ap.parse_args(argv)
    n = args.rounds or (7 if args.quick else 21)
    threads = torch.get_num_threads()
    has_ort, has_ov, has_jax = available("onnxruntime"), available("openvino"), \
        available("jax")
    print(f"{cpu_model()}; pyrnn CPU loops: {pyrnn._C.cpu_capability()} "
          f"(this CPU runs {pyrnn._C.supported_capabilities()}); torch {torch.__version__}, "
          f"{threads} threads; {n} rounds, medians; {args.settle * 1e3:g} ms between calls")
    flags = set((cpuinfo("flags") or "").split())
    print("bfloat16 instructions: " + (", ".join(
        f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"))
    ov_default = openvino_precision() if has_ov else None
    print("runtimes: " + ", ".join(
        [name for name, ok in (("onnxruntime", has_ort), ("openvino", has_ov), ("jax", has_jax))
         if ok]) + (f"; OpenVINO's default precision here: {ov_default}" if has_ov else ""))
    if not args.autocast_only:
        print(f"\n{'cell':8} {'shape':5} {'pass':9} {'side':18} {'ms':>9} {'pyrnn ms':>9} "
              f"{'pyrnn/side':>10}")
    cells, shapes = args.cells.split(","), args.shapes.split(",")
    for cell in cells if not args.autocast_only else []:
        for sname in shapes:
            ref, ours, x, g = make_pair(cell, *SHAPES[sname])
            sides = {"pyrnn": run_fwd(ours, x), "torch.nn": run_fwd(ref, x)}
            if has_ort or has_ov:
                model = onnx_bytes(ref, x)
            if has_ort:
                sides["onnxruntime"] = ort_runner(model, x, threads)
            if has_ov:
                sides["openvino f32"] = openvino_runner(model, x, threads, "f32")
                if ov_default != "f32":
                    sides[f"openvino {ov_default}"] = openvino_runner(model, x, threads, None)
            report(cell, sname, "inference", rounds(sides, n, settle_s=args.settle))
            sides = {"pyrnn": run_fwdbwd(ours, x, g), "torch.nn": run_fwdbwd(ref, x, g)}
            if has_jax:
                sides["jax (jit scan)"] = jax_runner(cell, ref, x, g)
            report(cell, sname, "training", rounds(sides, n, settle_s=args.settle))
    if not args.no_autocast:
        autocast_table([c for c in cells if c in ("lstm", "gru")],
                       [s for s in shapes if s != "S4"], n)
    return 0


def report(cell, sname, pas, times):
    mine = times.pop("pyrnn")
    mp = statistics.median(mine)
    for side, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(mine, ts))
        print(f"{cell:8} {sname:5} {pas:9} {side:18} {statistics.median(ts)*1e3:9.3f} "
              f"{mp*1e3:9.3f} {ratio:10.2f}", flush=True)


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
