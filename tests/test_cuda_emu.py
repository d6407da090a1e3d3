"""The CUDA backend executed on the CPU: csrc/cuda (the time loops of loops.h and the
kernels of kernels.cu, the same sources nvcc compiles) built with g++ against the SIMT
emulator of tests/cuda_emu, compared with the CPU ops.

What runs: tests/cuda_emu/driver.cpp, one executable per build flavour (plain, ASan +
UBSan, TSan), built once per source state under build/cuda_emu (PYRNN_EMU_BUILD moves
it). The test writes each case's inputs to a file, the driver runs the CUDA time loop on
them and writes what it produced; the products outside the loop (input projection,
dX, dW) are computed here from the loop's outputs as cuda_ops.cpp computes them with ATen.

Tolerances (normwise: max |emulated - reference| / max |reference|, per tensor), with u
the unit roundoff of the dtype (2^-24 float32, 2^-53 float64, 2^-11 float16, 2^-8
bfloat16):
- float32 / float64: against the CPU op in the same dtype, err <= 16 sqrt(K) u, K = G*H
  + I + P the longest sum of a product. Both sides compute the same sums in a different
  order (products here in one sequential sum, the CPU in blocked SIMD kernels), whose
  rounding errors grow as sqrt(K) u for terms of random sign, and different exp/tanh (C
  library here, the kernels' own polynomials on the CPU, a few ulp), through at most
  T = 6 steps of recurrence; the worst seen is about 57 u in float64 at K = 3303
  (bound 920 u) and 25 u in float32 at K = 4403 (bound 1060 u).
- float16 / bfloat16: against the CPU op in float64 on the same (rounded) inputs, the
  backward fed the emulated forward's outputs (a rounding can move a ReLU
  pre-activation across zero, which changes the path, not the precision), err <= 8 u:
  every stored value is rounded once to 16 bits and the state carries that rounding
  through the steps; the worst seen is about 2 u.
"""
import hashlib
import os
import shutil
import subprocess
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pyrnn import ops

REPO = Path(__file__).resolve().parents[1]
EMU = REPO / "tests" / "cuda_emu"
BUILD = Path(os.environ.get("PYRNN_EMU_BUILD", REPO / "build" / "cuda_emu"))
CXX = os.environ.get("CXX", "g++")

# The registry's cells (csrc/cells/registry.h): index, gates, workspace width by mode.
MODES = {name: k for k, name in enumerate(ops.CELLS)}
GATES = ops.GATES
SAVED = {m: c["workspace"] for m, c in ops.CELLS.items() if c["workspace"]}
HAS_CELL = {m: c["has_cell"] for m, c in ops.CELLS.items()}
LAYER_NORM = {m for m, c in ops.CELLS.items() if c["layer_norm"]}
# Each cell's constants at 20 times their defaults (a negative slope of 0.2), so that a
# constant that did not reach the kernels would show.
PARAMS = {m: [20 * v for v in c["params"].values()] for m, c in ops.CELLS.items()}
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}
TOL_FACTOR = {torch.float32: 16, torch.float64: 16, torch.float16: 8, torch.bfloat16: 8}
SHORT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}

FLAVOURS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}


# ---------------------------------------------------------------------------- build

def _source_digest(csrc, flags, extra=()):
    h = hashlib.sha256(" ".join([CXX, *flags]).encode())
    files = sorted(EMU.glob("*.h")) + sorted(EMU.glob("*.cpp"))
    files += sorted((csrc / "cuda").glob("*")) + sorted((csrc / "cells").glob("*.h"))
    for f in [*files, *extra]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Build:
    """One compile of an emulator program, started in the background."""

    def __init__(self, flavour, main="driver.cpp", csrc=REPO / "csrc", name=None):
        flags = FLAVOURS[flavour]
        self.path = BUILD / f"{name or main[:-4]}-{flavour}-{_source_digest(csrc, flags)}"
        self.proc = None
        if self.path.exists():
            return
        BUILD.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        cmd = [CXX, "-std=c++17", *flags, "-Wall", "-Wno-unknown-pragmas", f"-I{EMU}",
               f"-I{csrc}", str(EMU / main), str(EMU / "emu.cpp"), "-o", str(self.tmp),
               "-pthread"]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def cancel(self):
        """Stops a build nobody waited for (a deselected test's), leaving no files."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.communicate()
            self.tmp.unlink(missing_ok=True)
            self.proc = None

    def wait(self):
        if self.proc is not None:
            out, _ = self.proc.communicate()
            assert self.proc.returncode == 0, f"{' '.join(self.cmd)}\n{out}"
            assert "warning" not in out, out
            os.replace(self.tmp, self.path)
            self.proc = None
        return self.path


_builds = {}


def build(flavour, main="driver.cpp"):
    key = (flavour, main)
    if key not in _builds:
        _builds[key] = Build(flavour, main)
    return _builds[key]


# Broken copies of kernels.cu, which the harness must report: (flavour, old text, new text)
MUTANTS = {
    # the bounds guard of the forward kernel: threads past H write past the rows
    "no_guard": ("asan", "  if (j >= H) return;\n  const int64_t r = t * B + b;\n  T* row",
                 "  const int64_t r = t * B + b;\n  T* row"),
    # the barrier between the warps' partial sums and their reduction by warp 0
    "no_barrier": ("tsan", "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();\n",
                   "  if (lane == 0) warp_sums[warp] = v;\n"),
}


def mutant_build(name, root):
    flavour, old, new = MUTANTS[name]
    key = ("mutant", name)
    if key not in _builds:
        csrc = Path(root) / name / "csrc"
        shutil.copytree(REPO / "csrc", csrc)
        src = csrc / "cuda" / "kernels.cu"
        text = src.read_text()
        assert text.count(old) == 1, f"{name}: the text to remove is not in kernels.cu once"
        src.write_text(text.replace(old, new))
        _builds[key] = Build(flavour, csrc=csrc, name=f"mutant-{name}")
    return _builds[key]


def sanitizer_env():
    env = dict(os.environ)
    # ASan clears the shadow of a fiber's stack (512 KB, 64 KB of shadow) at every
    # swapcontext; at or above clear_shadow_mmap_threshold (64 KB by default) it does so
    # by remapping the shadow pages, two system calls per switch, which made the run
    # 5x slower than with a memset (measured: 6.0 s against 1.2 s for four large cases).
    env["ASAN_OPTIONS"] = ("detect_leaks=1:abort_on_error=0:halt_on_error=1:"
                           "clear_shadow_mmap_threshold=1048576")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:second_deadlock_stack=1"
    return env


# ---------------------------------------------------------------------------- files

def write_case(path, entries):
    with open(path, "wb") as f:
        for name, v in entries.items():
            if v is None:
                continue
            if isinstance(v, str):
                data = v.encode()
            elif isinstance(v, bool) or isinstance(v, int):
                data = struct.pack("<q", int(v))
            elif isinstance(v, float):
                data = struct.pack("<d", v)
            else:
                data = v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<q", len(data)))
            f.write(data)


def read_case(path):
    out = {}
    data = Path(path).read_bytes()
    k = 0
    while k < len(data):
        (n,) = struct.unpack_from("<i", data, k)
        name = data[k + 4:k + 4 + n].decode()
        (size,) = struct.unpack_from("<q", data, k + 4 + n)
        k += 12 + n
        out[name] = data[k:k + size]
        k += size
    return out


def tensor(raw, dtype, shape):
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()


# ---------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Spec:
    mode: str
    dtype: torch.dtype
    T: int
    B: int
    I: int
    H: int
    P: int = 0  # LSTM projection size, 0 for none
    bias: bool = True
    lengths: tuple = None
    reverse: bool = False
    clip: float = 0.0
    record: bool = True
    state_grad: bool = True  # incoming dLoss/dh_n (and dc_n)
    seed: int = 0

    @property
    def id(self):
        s = f"{self.mode}-{SHORT[self.dtype]}-T{self.T}B{self.B}I{self.I}H{self.H}"
        s += f"P{self.P}" if self.P else ""
        s += "" if self.bias else "-nobias"
        s += f"-len{''.join(map(str, self.lengths))}" if self.lengths else ""
        s += "-rev" if self.reverse else ""
        s += f"-clip{self.clip}" if self.clip else ""
        s += "" if self.record else "-norec"
        return s


SHAPES = [
    # H = 33: two warps, the second partial; lengths unsorted, one of them 0
    dict(T=5, B=3, I=4, H=33, lengths=(3, 0, 5), record=True),
    # H = 1, B = 1, no bias, reversed, clipped, no recording, no incoming state gradient
    dict(T=4, B=1, I=3, H=1, bias=False, reverse=True, clip=0.05, record=False,
         state_grad=False),
    # a few hundred units: several blocks per sample (forward), 320 threads reducing
    dict(T=3, B=2, I=5, H=300, lengths=(3, 1), reverse=True),
    # H > 1024: a reducing block of 1024 threads loops over the units
    dict(T=2, B=2, I=3, H=1100),
    # a larger batch, clipped, lengths in every order, reversed
    dict(T=6, B=9, I=2, H=20, lengths=(6, 2, 6, 0, 1, 5, 6, 3, 4), reverse=True, clip=0.1),
    # sorted lengths, not recording, clipped, forward direction
    dict(T=4, B=4, I=6, H=40, lengths=(4, 4, 2, 1), clip=0.5, record=False),
]
PROJ_SHAPES = [
    dict(T=5, B=3, I=4, H=33, P=7, lengths=(5, 0, 2), reverse=True, clip=0.3),
    dict(T=4, B=2, I=3, H=40, P=50, lengths=(2, 4)),
    dict(T=3, B=1, I=2, H=1, P=1, bias=False, record=False),
]


def all_specs():
    specs = []
    for dtype in DTYPES:
        for mode in MODES:
            for k, shape in enumerate(SHAPES):
                if mode in LAYER_NORM and shape["H"] == 1 and dtype in (torch.float16,
                                                                         torch.bfloat16):
                    # A norm over one unit is degenerate (LN(c_t) = beta_c; dLoss/dh_0 is a
                    # difference of terms about 10^6 times its size), so a 16-bit result
                    # of it has no normwise error to speak of; float32 and float64 run it.
                    continue
                specs.append(Spec(mode, dtype, seed=len(specs), **shape))
        for shape in PROJ_SHAPES:
            specs.append(Spec("lstm", dtype, seed=len(specs), **shape))
    return specs


SPECS = all_specs()
# TSan: the small shapes, both wide dtypes and one narrow one, every cell and projection
TSAN_SPECS = [s for s in SPECS if s.H <= 33 and s.B <= 3 and s.dtype != torch.bfloat16]


@dataclass
class Inputs:
    x: torch.Tensor
    hx: torch.Tensor
    cx: torch.Tensor
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor
    b_hh: torch.Tensor
    w_hr: torch.Tensor
    lengths: torch.Tensor
    dy: torch.Tensor
    dh_n: torch.Tensor
    dc_n: torch.Tensor
    cw: torch.Tensor = None  # a layer-normalised cell's own weights
    extra: dict = field(default_factory=dict)

    def to(self, dtype):
        conv = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in self.__dict__.items() if k != "extra"}
        return Inputs(**conv)


def make_inputs(s):
    """Inputs in s.dtype (16-bit values are exactly representable in float64)."""
    g = torch.Generator().manual_seed(1000 + s.seed)
    G = GATES[s.mode]
    P = s.P or s.H

    def uni(*shape, k):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k).to(s.dtype)

    def rnd(*shape, k=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * k).to(s.dtype)

    k = 1.0 / s.H**0.5  # torch.nn's initialisation
    return Inputs(
        x=rnd(s.T, s.B, s.I),
        hx=rnd(s.B, P, k=0.5),
        cx=rnd(s.B, s.H, k=0.5) if HAS_CELL[s.mode] else None,
        w_ih=uni(G * s.H, s.I, k=k),
        w_hh=uni(G * s.H, P, k=k),
        b_ih=uni(G * s.H, k=k) if s.bias else None,
        b_hh=uni(G * s.H, k=k) if s.bias else None,
        w_hr=uni(P, s.H, k=k) if s.P else None,
        lengths=torch.tensor(s.lengths, dtype=torch.long) if s.lengths else None,
        dy=rnd(s.T, s.B, P),
        dh_n=rnd(s.B, P) if s.state_grad else None,
        dc_n=rnd(s.B, s.H) if s.state_grad and HAS_CELL[s.mode] else None,
        # gains around 1, the cell state's bias around 0
        cw=(uni(10 * s.H, k=0.3).double() + torch.cat(
            [torch.ones(9 * s.H, dtype=torch.float64), torch.zeros(s.H, dtype=torch.float64)])
            ).to(s.dtype) if s.mode in LAYER_NORM else None,
    )


def meta(s, W, op, order_seed):
    return dict(op=op, dtype=DTYPES[s.dtype], mode=MODES[s.mode], G=GATES[s.mode], T=s.T,
                B=s.B, H=s.H, P=s.P or s.H, proj=s.P, W=W, reverse=s.reverse,
                seed=order_seed, clip=float(s.clip), record=s.record,
                k=torch.tensor(PARAMS[s.mode], dtype=torch.float64) if PARAMS[s.mode] else None)


def fwd_width(s):
    return SAVED.get(s.mode, GATES[s.mode]) * s.H  # as cuda_ops.cpp with save = True


def forward_case(s, inp, order_seed):
    """The forward's inputs, as cuda_ops.cpp prepares them: ws[..., :G*H] holds the input
    projection (in float64, rounded once to the dtype, as cuBLAS accumulates in float),
    the rest of ws is unwritten memory (NaN here)."""
    GH, W = GATES[s.mode] * s.H, fwd_width(s)
    ws = torch.full((s.T, s.B, W), float("nan"), dtype=torch.float64)
    proj = inp.x.double().reshape(s.T * s.B, s.I) @ inp.w_ih.double().T
    if s.mode in LAYER_NORM:  # LN(x W_ih^T) gamma_ih + b_ih, as layer_norm.h
        proj = torch.nn.functional.layer_norm(
            proj, (GH,), inp.cw.double()[:GH], None if inp.b_ih is None else inp.b_ih.double(),
            PARAMS[s.mode][0])
    elif inp.b_ih is not None:
        proj = proj + inp.b_ih.double()
    ws[..., :GH] = proj.reshape(s.T, s.B, GH)
    return dict(meta(s, W, "forward", order_seed), ws=ws.to(s.dtype), lengths=inp.lengths, h0=inp.hx,
                c0=inp.cx, w_hh=inp.w_hh, b_hh=inp.b_hh, w_hr=inp.w_hr, cw=inp.cw)


def unpack_forward(s, raw):
    P = s.P or s.H
    y = tensor(raw["y"], s.dtype, (s.T, s.B, P))
    h_n = tensor(raw["h_n"], s.dtype, (s.B, P))
    c_n = tensor(raw["c_n"], s.dtype, (s.B, s.H)) if HAS_CELL[s.mode] else None
    ws = tensor(raw["ws"], s.dtype, (s.T, s.B, fwd_width(s)))
    return dict(output=y, h_n=h_n, c_n=c_n, workspace=ws if s.mode in SAVED else None)


def backward_case(s, inp, fwd, order_seed):
    W = SAVED.get(s.mode, 0) * s.H
    return dict(meta(s, W, "backward", order_seed), lengths=inp.lengths, h0=inp.hx, c0=inp.cx,
                w_hh=inp.w_hh, w_hr=inp.w_hr, dy=inp.dy, dh_n=inp.dh_n, dc_n=inp.dc_n,
                y=fwd["output"], ws=fwd["workspace"], cw=inp.cw)


def unpack_backward(s, raw, inp, ws=None):
    """The op's results from what the loop wrote, with the products after the loop done
    as cuda_ops.cpp does them (in float64 here, rounded once to the dtype); ws: the
    forward's workspace (read for a layer-normalised cell's weight gradients)."""
    T, B, H, P, GH = s.T, s.B, s.H, s.P or s.H, GATES[s.mode] * s.H
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    gx = tensor(raw["gx"], s.dtype, (T * B, GH)).double()
    gh = tensor(raw["gh"], s.dtype, (T * B, GH)).double() if ops.CELLS[s.mode]["split_grad"] \
        else gx
    hprev = tensor(raw["hprev"], s.dtype, (T * B, P)).double()
    x = inp.x.double().reshape(T * B, s.I)
    gin, grad_cw, gbh = gx, None, gh
    if s.mode in LAYER_NORM:  # as layer_norm.h: through the input side's norm
        eps = PARAMS[s.mode][0]
        dnorm = tensor(raw["dnorm"], s.dtype, (T * B, H)).double()
        ws = ws.double().reshape(T * B, -1)  # the forward's workspace
        proj = x @ inp.w_ih.double().T
        g_ih = inp.cw.double()[:GH]
        _, mean, rstd = torch.ops.aten.native_layer_norm(proj, [GH], g_ih, None, eps)
        gin = torch.ops.aten.native_layer_norm_backward(gx, proj, [GH], mean, rstd, g_ih, None,
                                                        [True, False, False])[0]
        grad_cw = torch.cat([(gx * (proj - mean) * rstd).sum(0), (gx * ws[:, GH:2 * GH]).sum(0),
                             (dnorm * ws[:, 2 * GH:2 * GH + H]).sum(0), dnorm.sum(0)])
        gbh = gx
    out = dict(
        grad_input=(gin @ inp.w_ih.double()).reshape(T, B, s.I),
        grad_hx=tensor(raw["dh0"], s.dtype, (B, P)).double(),
        grad_cx=tensor(raw["dc0"], s.dtype, (B, H)).double() if HAS_CELL[s.mode] else None,
        grad_w_ih=gin.T @ x,
        grad_w_hh=gh.T @ hprev,
        grad_b_ih=gx.sum(0) if s.bias else None,
        grad_b_hh=gbh.sum(0) if s.bias else None,
        grad_w_hr=None,
        norms=tensor(raw["norms"], s.dtype, (2, T, B)).double() if s.record else None,
        grad_cw=grad_cw,
    )
    if s.P:
        dhtot = tensor(raw["dhtot"], acc, (T * B, P)).double()
        mall = tensor(raw["mall"], s.dtype, (T * B, H)).double()
        out["grad_w_hr"] = dhtot.T @ mall
    return {k: (v.to(s.dtype) if v is not None else None) for k, v in out.items()}


FWD_NAMES = ("output", "h_n", "c_n", "workspace")
BWD_NAMES = ("grad_input", "grad_hx", "grad_cx", "grad_w_ih", "grad_w_hh", "grad_b_ih",
             "grad_b_hh", "grad_w_hr", "norms")


def cpu_forward(s, inp):
    r = torch.ops.pyrnn.forward(s.mode, inp.x, inp.hx, inp.cx, inp.w_ih, inp.w_hh, inp.b_ih,
                                inp.b_hh, inp.w_hr, inp.lengths, s.reverse, True, s.clip, None,
                                cell_params=PARAMS[s.mode], cell_weight=inp.cw)
    return {k: (v if v.numel() else None) for k, v in zip(FWD_NAMES, r)}


def cpu_backward(s, inp, fwd):
    ws = fwd["workspace"] if fwd["workspace"] is not None else inp.x.new_empty(0)
    r = torch.ops.pyrnn.backward(s.mode, inp.dy, inp.dh_n, inp.dc_n, inp.x, inp.hx, inp.cx,
                                 inp.w_ih, inp.w_hh, inp.w_hr, s.bias, True, inp.lengths,
                                 fwd["output"], ws, s.reverse, s.clip, s.record,
                                 cell_params=PARAMS[s.mode], cell_weight=inp.cw)
    out = {k: (v if v.numel() else None) for k, v in zip(BWD_NAMES, r)}
    out["grad_cw"] = r[11] if r[11].numel() else None
    return out


def normwise_error(a, ref):
    a, ref = a.double(), ref.double()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (a - ref).abs().max().item() if ref.numel() else 0.0
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


def compare(s, emu, ref, floor=None):
    """Normwise errors of every result; asserts each within the dtype's tolerance, or
    within twice floor[name] (the CPU's own error, where given) when that is larger."""
    tol = TOL_FACTOR[s.dtype] * UNIT_ROUNDOFF[s.dtype]
    if s.dtype in (torch.float32, torch.float64):
        tol *= (GATES[s.mode] * s.H + s.I + s.P) ** 0.5
    floor = floor or {}
    errors = {}
    for name, r in ref.items():
        e = emu.get(name)
        assert (e is None) == (r is None), f"{name}: emulated {e is not None}, cpu {r is not None}"
        if r is None:
            continue
        if name == "norms" and not HAS_CELL[s.mode]:
            e, r = e[0], r[0]
        errors[name] = normwise_error(e, r)
    bad = {k: v for k, v in errors.items() if not v <= max(tol, 2 * floor.get(k, 0.0))}
    assert not bad, f"{s.id}: errors above {tol:.3g} ({tol / UNIT_ROUNDOFF[s.dtype]:.0f} u): {bad}"
    return errors


# ---------------------------------------------------------------------------- running

def run_driver(exe, paths, env=None, timeout=900):
    r = subprocess.run([str(exe), *map(str, paths)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    return r


class Emulated:
    """Runs every spec through the driver (forward, then backward on its outputs)."""

    def __init__(self, exe, specs, workdir, order_seed=0):
        self.specs = specs
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.inputs = {s: make_inputs(s) for s in specs}
        fwd_paths = []
        for k, s in enumerate(specs):
            p = self.dir / f"{k:03d}-fwd"
            write_case(p, forward_case(s, self.inputs[s], order_seed + 2 * s.seed))
            fwd_paths.append(p)
        r = run_driver(exe, fwd_paths)
        assert r.returncode == 0, r.stderr[-4000:]
        self.fwd = {s: unpack_forward(s, read_case(f"{p}.out")) for s, p in zip(specs, fwd_paths)}
        bwd_paths = []
        for k, s in enumerate(specs):
            p = self.dir / f"{k:03d}-bwd"
            write_case(p, backward_case(s, self.inputs[s], self.fwd[s], order_seed + 2 * s.seed + 1))
            bwd_paths.append(p)
        r = run_driver(exe, bwd_paths)
        assert r.returncode == 0, r.stderr[-4000:]
        self.raw_bwd = {s: read_case(f"{p}.out") for s, p in zip(specs, bwd_paths)}
        self.bwd = {s: unpack_backward(s, self.raw_bwd[s], self.inputs[s], self.fwd[s]["workspace"])
                    for s in specs}
        self.paths = fwd_paths + bwd_paths


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Starts every build this module needs at once (they compile in parallel)."""
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}) to build the CUDA emulator")
    b = {f: build(f) for f in ("plain", "asan", "tsan")}
    b["selftest"] = build("plain", "selftest.cpp")
    b["selftest-tsan"] = build("tsan", "selftest.cpp")
    root = tmp_path_factory.mktemp("mutants")
    for name in MUTANTS:
        b[name] = mutant_build(name, root)
    yield b
    for x in b.values():
        x.cancel()
    _builds.clear()


@pytest.fixture(scope="module")
def emulated(builds, tmp_path_factory):
    return Emulated(builds["plain"].wait(), SPECS, tmp_path_factory.mktemp("emu-plain"))


def reference(s, inp, emu_fwd):
    """The CPU op's results for spec s: in the dtype for float32 / float64; in float64 on
    the same values for the 16-bit types, the backward fed the emulated forward. Returns
    (forward, backward, floor): floor, for a layer-normalised cell in float32, the CPU's
    own float32 error of each result against float64, which is then the reference.
    (A layer norm's backward subtracts means of products from values of similar size,
    so a gradient can be far smaller than the terms that make it, and a normwise error
    of a few ulps of the terms then reads as a large relative error of the result: with
    H = 1 the norm of c_t is degenerate and dLoss/dh_0 comes out as such a difference.
    Two float32 computations of it need not agree better than each agrees with the
    truth.)"""
    if s.dtype == torch.float32 and s.mode in LAYER_NORM:
        inp64 = inp.to(torch.float64)
        fwd64 = cpu_forward(s, inp64)
        bwd64 = cpu_backward(s, inp64, fwd64)
        fwd32 = cpu_forward(s, inp)
        bwd32 = cpu_backward(s, inp, fwd32)
        floor = {k: normwise_error(v, r) for res, ref in ((fwd32, fwd64), (bwd32, bwd64))
                 for (k, v), r in zip(res.items(), ref.values()) if v is not None}
        return fwd64, bwd64, floor
    if s.dtype in (torch.float32, torch.float64):
        fwd = cpu_forward(s, inp)
        return fwd, cpu_backward(s, inp, fwd), None
    inp64 = inp.to(torch.float64)
    fwd = cpu_forward(s, inp64)
    fed = {k: (v.double() if v is not None else None) for k, v in emu_fwd.items()}
    return fwd, cpu_backward(s, inp64, fed), None


ERRORS = {}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_emulated_cuda_matches_cpu(emulated, spec):
    inp = emulated.inputs[spec]
    ref_fwd, ref_bwd, floor = reference(spec, inp, emulated.fwd[spec])
    errors = compare(spec, emulated.fwd[spec], ref_fwd, floor)
    errors.update(compare(spec, emulated.bwd[spec], ref_bwd, floor))
    ERRORS[spec] = errors


def test_error_summary(emulated):
    """Prints the worst error per dtype (pytest -s shows it); every case must have run."""
    missing = [s.id for s in SPECS if s not in ERRORS]
    if missing and len(missing) == len(SPECS):
        pytest.skip("run together with test_emulated_cuda_matches_cpu")
    for dtype in DTYPES:
        worst = max(((v, k, s.id) for s, e in ERRORS.items() if s.dtype == dtype
                     for k, v in e.items()), default=None)
        if worst:
            u = UNIT_ROUNDOFF[dtype]
            print(f"{SHORT[dtype]}: worst normwise error {worst[0]:.3g} ({worst[0] / u:.2f} u) "
                  f"in {worst[1]} of {worst[2]}")
    assert not missing, missing


def test_padded_steps_zero_the_workspace(emulated):
    """On a step past a sequence's length the forward zeroes the whole workspace row (the
    input projection and the unwritten c_t / saved slots, NaN before the loop)."""
    checked = 0
    for s in SPECS:
        if not s.lengths or s.mode not in SAVED:
            continue
        ws = emulated.fwd[s]["workspace"]
        for b, n in enumerate(s.lengths):
            assert torch.equal(ws[n:, b], torch.zeros_like(ws[n:, b])), s.id
            assert not ws[:n, b].isnan().any(), s.id
            checked += n < s.T
    assert checked > 0


def test_order_does_not_change_results(builds, emulated, tmp_path):
    """Another seed (another block order and thread interleaving) gives the same bits."""
    specs = [s for s in SPECS if s.H <= 40 and s.dtype in (torch.float32, torch.float16)]
    again = Emulated(builds["plain"].wait(), specs, tmp_path, order_seed=10**6)
    for s in specs:
        a, b = emulated.raw_bwd[s], again.raw_bwd[s]
        assert a.keys() == b.keys()
        for k in a:
            if k != "stats":
                assert a[k] == b[k], (s.id, k)


def _rerun(exe, emulated, specs, env):
    """Runs the case files of specs again with exe; returns the result and the files."""
    paths = []
    for k, s in enumerate(emulated.specs):
        if s not in specs:
            continue
        for p in (emulated.dir / f"{k:03d}-fwd", emulated.dir / f"{k:03d}-bwd"):
            paths.append(p)
    r = run_driver(exe, paths, env=env)
    return r, paths


@pytest.mark.parametrize("flavour", ["asan", "tsan"])
def test_sanitized_build_same_results(builds, emulated, flavour):
    """The cases under a sanitizer (ASan + UBSan: all of them; TSan: TSAN_SPECS): no
    report, and the same outputs as the plain build."""
    exe = builds[flavour].wait()
    specs = SPECS if flavour == "asan" else TSAN_SPECS
    r, paths = _rerun(exe, emulated, specs, sanitizer_env())
    assert r.returncode == 0, r.stderr[-6000:]
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-6000:]
    for p in paths:  # the .out files were rewritten by the sanitized run
        out = read_case(f"{p}.out")
        assert "error" not in out, out["error"]
    # every backward of these specs again against the CPU
    for k, s in enumerate(emulated.specs):
        if s in specs:
            bwd = unpack_backward(s, read_case(emulated.dir / f"{k:03d}-bwd.out"),
                                  emulated.inputs[s], emulated.fwd[s]["workspace"])
            for name, v in bwd.items():
                ref = emulated.bwd[s][name]
                assert (v is None and ref is None) or torch.equal(v, ref), (s.id, name)


# ---------------------------------------------------------------------------- the harness bites

def _case_of(emulated, pred, op):
    for k, s in enumerate(emulated.specs):
        if pred(s):
            return emulated.dir / f"{k:03d}-{op}"
    raise AssertionError("no such spec")


def test_removed_guard_is_reported(builds, emulated):
    """kernels.cu without the forward's `if (j >= H) return;`: ASan reports the writes past
    the buffers (H = 33 runs 64 threads per block), in forward_step_kernel. The kind it
    names depends on what lies past the buffer (another buffer's red zone, freed memory),
    so any ASan error report counts; a run without one fails."""
    case = _case_of(emulated, lambda s: s.H == 33 and s.dtype == torch.float32
                    and s.mode == "rnn_tanh", "fwd")
    r = run_driver(builds["no_guard"].wait(), [case], env=sanitizer_env())
    assert r.returncode != 0
    assert "ERROR: AddressSanitizer: " in r.stderr, r.stderr[-3000:]
    report = r.stderr[r.stderr.index("ERROR: AddressSanitizer: "):]
    assert "forward_step_kernel" in report, report[:3000]


def test_removed_barrier_is_reported(builds, emulated):
    """kernels.cu without the barrier after the warps' partial sums in block_sum: TSan
    reports warp 0 reading what the other warps' lane 0 wrote (a recording backward with
    H = 33: two warps)."""
    case = _case_of(emulated, lambda s: s.H == 33 and s.dtype == torch.float32
                    and s.mode == "gru" and s.record and not s.P, "bwd")
    r = run_driver(builds["no_barrier"].wait(), [case], env=sanitizer_env())
    assert r.returncode != 0
    assert "ThreadSanitizer: data race" in r.stderr, r.stderr[-3000:]
    assert "block_sum" in r.stderr


def selftest(builds, name, seed=1, flavour="selftest"):
    r = subprocess.run([str(builds[flavour].wait()), name, str(seed)], capture_output=True,
                       text=True, env=sanitizer_env(), timeout=300)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_emulator_block_reduction_and_shuffles(builds, seed):
    """__syncthreads, __shared__ and the shuffles exchange as on a GPU: a 1024-thread block
    sum over 3 blocks, and __shfl_xor/__shfl/__shfl_up results checked lane by lane."""
    for name in ("sum", "shuffle"):
        rc, out = selftest(builds, name, seed)
        assert rc == 0 and f"ok {name}" in out, out


@pytest.mark.parametrize("name, expected", [
    ("early_exit", "which has exited"),
    ("partial_warp", "names lane 16 of warp 1, which does not exist"),
    ("divergent_barrier", "wait at different __syncthreads"),
    ("deadlock", "deadlock: 0 threads exited, 1 wait at __syncthreads, 31 at a warp operation"),
    ("bad_config", "invalid configuration argument"),
])
def test_strict_mode_reports(builds, name, expected):
    """What a GPU leaves undefined or hangs on fails the launch with a report."""
    rc, out = selftest(builds, name)
    assert rc != 0 and expected in out, out


def test_tsan_reports_a_missing_barrier(builds):
    rc, out = selftest(builds, "missing_barrier", flavour="selftest-tsan")
    assert rc != 0 and "ThreadSanitizer: data race" in out, out
