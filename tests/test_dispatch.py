"""Runtime dispatch of the CPU loops by instruction set: every compiled copy that this CPU
runs is forced in turn and checked against torch.nn (float64: round-off; float32: twice
torch.nn's own float32 error against a float64 run, plus a few ulp, as in
test_torch_nn_parity.py)."""
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyrnn
from pyrnn import _C
from conftest import SUPPORTED

COMPILED = _C.compiled_capabilities().split(",")


def _python(args, env=None, check=True):
    """Runs python with args in a fresh process that imports the pyrnn this one imported
    (from an empty directory, so that a source tree cannot shadow an installed package)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(pyrnn.__file__)))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          check=check, cwd=tempfile.gettempdir())


def test_capabilities_listed():
    assert "default" in COMPILED and SUPPORTED[0] == "default"
    assert all(c in COMPILED for c in SUPPORTED)
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert COMPILED == ["default", "avx2", "avx512", "avx512_bf16", "avx512_amx"]
        flags = open("/proc/cpuinfo").read().split("\nflags")[1].split("\n")[0].split()
        assert ("avx2" in SUPPORTED) == ("avx2" in flags and "fma" in flags)
        assert ("avx512" in SUPPORTED) == all(
            f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))
        assert ("avx512_bf16" in SUPPORTED) == ("avx512" in SUPPORTED and "avx512_bf16" in flags)
        # the matrix units' bfloat16 products come from the library torch carries, which
        # runs them wherever the CPU has AMX-BF16 (and the kernel grants the tiles)
        assert ("avx512_amx" in SUPPORTED) == ("avx512_bf16" in SUPPORTED and
                                               "amx_bf16" in flags and "amx_tile" in flags)


def test_best_capability_by_default():
    env = {k: v for k, v in os.environ.items() if k != "PYRNN_CPU_CAPABILITY"}
    out = _python(["-c", "import pyrnn; print(pyrnn._C.cpu_capability())"], env).stdout.split()
    assert out == [SUPPORTED[-1]]


@pytest.mark.parametrize("name", SUPPORTED)
def test_environment_variable_forces_a_capability(name):
    env = dict(os.environ, PYRNN_CPU_CAPABILITY=name)
    out = _python(["-c", "import pyrnn; print(pyrnn._C.cpu_capability())"], env).stdout.split()
    assert out == [name]


def test_environment_variable_unknown_warns_and_keeps_the_best():
    env = dict(os.environ, PYRNN_CPU_CAPABILITY="sse9")
    r = _python(["-c", "import pyrnn; print(pyrnn._C.cpu_capability())"], env)
    assert r.stdout.split() == [SUPPORTED[-1]]
    assert "PYRNN_CPU_CAPABILITY: expected one of" in r.stderr and "'sse9'" in r.stderr


@pytest.mark.parametrize("name", ["sse9", ""] + [c for c in COMPILED if c not in SUPPORTED])
def test_set_unsupported_capability_raises(name):
    before = _C.cpu_capability()
    with pytest.raises(RuntimeError, match=f"expected one of .*got '{name}'"):
        _C.set_cpu_capability(name)
    assert _C.cpu_capability() == before


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _run(module, x, lengths, grad):
    """Output and h_n (and c_n), and the gradients of every parameter and of x for the
    cotangent grad of the output."""
    x = x.detach().clone().requires_grad_(True)
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, state = module(inp)
    if lengths is not None:
        out = pad_packed_sequence(out, total_length=x.shape[0])[0]
    states = list(state) if isinstance(state, tuple) else [state]
    (out * grad).sum().backward()
    res = [out, *states, x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad()
    return [r.detach() for r in res]


def _float64_and_torch(cls, x, grad, *args, **kwargs):
    """cls(*args, **kwargs) in float32 (seeded), its results (_run) in float32, torch.nn's,
    and those of its float64 copy, the exact ones."""
    torch.manual_seed(0)
    ref32 = cls(*args, **kwargs)
    ref64 = cls(*args, **kwargs).double()
    ref64.load_state_dict(ref32.state_dict())
    return ref32, _run(ref32, x, None, grad), _run(ref64, x.double(), None, grad.double())


def _assert_near(ours, theirs, exact):
    """Each result within twice torch.nn's float32 error against float64, plus 8 ulps of
    the largest value (a float32 rounding of the sums' order: the kernels and torch.nn sum
    in different orders)."""
    eps = torch.finfo(torch.float32).eps
    for k, (o, r, e) in enumerate(zip(ours, theirs, exact)):
        scale = max(e.abs().max().item(), 1.0)
        assert _err(o, e) <= 2 * _err(r, e) + 8 * eps * scale, (k, _err(o, e), _err(r, e))


CASES = [  # cls, kwargs, T, B, I (batch 13: blocks of 6 or 8 rows and a tail; H 37: panel tails)
    (nn.RNN, dict(hidden_size=37), 6, 13, 11),
    (nn.RNN, dict(hidden_size=16, nonlinearity="relu", num_layers=2), 5, 3, 7),
    (nn.LSTM, dict(hidden_size=37, bidirectional=True), 6, 13, 11),
    (nn.LSTM, dict(hidden_size=24, proj_size=9), 5, 9, 10),
    (nn.GRU, dict(hidden_size=37), 6, 13, 11),
    (nn.GRU, dict(hidden_size=40, bidirectional=True, num_layers=2), 4, 2, 5),
]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: CASES[i][0].__name__ + str(i))
@pytest.mark.parametrize("capability", SUPPORTED, indirect=True)
def test_each_capability_matches_torch_nn(capability, case, packed):
    cls, kw, T, B, I = CASES[case]
    torch.manual_seed(case)
    ref32 = cls(I, **kw)
    ref64 = cls(I, **kw).double()
    ref64.load_state_dict(ref32.state_dict())
    ours32, ours64 = pyrnn.convert(ref32), pyrnn.convert(ref64)
    assert ours32 is not ref32 and ours64 is not ref64
    x = torch.randn(T, B, I)
    grad = torch.randn(T, B, ref32.proj_size or ref32.hidden_size * (1 + ref32.bidirectional))
    lengths = torch.randint(1, T + 1, (B,)) if packed else None
    if packed:
        lengths[0] = T
        grad = grad * (torch.arange(T)[:, None] < lengths[None, :])[..., None]
    exact = _run(ref64, x.double(), lengths, grad.double())
    theirs = _run(ref32, x, lengths, grad)
    for o, e in zip(_run(ours64, x.double(), lengths, grad.double()), exact):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)
    _assert_near(_run(ours32, x, lengths, grad), theirs, exact)


@pytest.mark.parametrize("capability", SUPPORTED, indirect=True)
def test_each_capability_cells_and_norms(capability):
    """The cells and the recorded norms run on the forced copy too (against float64)."""
    torch.manual_seed(0)
    cell = pyrnn.LSTMCell(9, 21)
    x, h = torch.randn(10, 9), torch.randn(10, 21)
    c64 = pyrnn.LSTMCell(9, 21).double()
    c64.load_state_dict(cell.state_dict())
    for a, b in zip(cell(x, (h, h)), c64(x.double(), (h.double(), h.double()))):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    m = pyrnn.GRU(8, 16, record_grad_norms=True)
    m64 = pyrnn.GRU(8, 16, record_grad_norms=True).double()
    m64.load_state_dict(m.state_dict())
    x = torch.randn(12, 9, 8)
    m(x)[0].pow(2).sum().backward()
    m64(x.double())[0].pow(2).sum().backward()
    torch.testing.assert_close(m.grad_norms.hidden.double(), m64.grad_norms.hidden,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("capability", SUPPORTED, indirect=True)
def test_row_blocks_change_no_bit(capability):
    """The register blocks of the float32 products (gemm_rows: 12 rows on Intel CPUs, 8 on
    others, in the AVX-512 copies) only group the rows of C: every output and gradient
    keeps its bits with blocks of 3, 8 and 12 rows. B = 27 gives blocks and a tail in the
    step products, T * B rows the input projection and the weight gradients (whose
    transposed left operand is copied block by block); a bfloat16 module runs the
    products of pairs."""
    torch.manual_seed(0)
    cases = [(pyrnn.LSTM(24, 40, bidirectional=True), 7, 27, torch.float32),
             (pyrnn.GRU(24, 40), 9, 27, torch.float32),
             (pyrnn.RNN(24, 40, num_layers=2), 30, 5, torch.float32),
             (pyrnn.LSTM(24, 40).bfloat16(), 7, 27, torch.bfloat16)]
    try:
        for module, T, B, dtype in cases:
            x = torch.randn(T, B, 24, dtype=dtype)
            grad = torch.randn(T, B, module.hidden_size * (1 + module.bidirectional),
                               dtype=dtype)
            runs = {}
            for rows in (3, 8, 12):
                _C.set_gemm_rows(rows)
                runs[rows] = _run(module, x, None, grad)
            for rows in (3, 8):
                for k, (a, b) in enumerate(zip(runs[rows], runs[12])):
                    assert torch.equal(a, b), (type(module).__name__, dtype, rows, k)
    finally:
        _C.set_gemm_rows(0)
    assert _C.gemm_rows() in (8, 12)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_matrices_beyond_the_second_level_cache(cls):
    """H = 512: W_hh packs into 3 - 4 MB, more than a core's second-level cache, with
    panels 512 rows deep, where the products prefetch their panels on Intel CPUs (gemm.h).
    Outputs and gradients against float64, within twice torch.nn's float32 error (plus
    8 ulps of the largest value, as above)."""
    x, grad = torch.randn(3, 13, 64), torch.randn(3, 13, 512)
    ref32, theirs, exact = _float64_and_torch(cls, x, grad, 64, 512)
    _assert_near(_run(pyrnn.convert(ref32), x, None, grad), theirs, exact)


@pytest.mark.parametrize("mode", [0, 1], ids=["pyrnn", "blas"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_weight_gradients_on_either_product(cls, mode):
    """The float32 weight gradients run on pyrnn's kernel (mode 0) or on libtorch's BLAS in
    fixed tiles of one sequential call each (mode 1, which takes the BLAS for dX too; the
    default on Intel CPUs from 2^24 flops). Either way: against float64 (_assert_near);
    bitwise the same on 1 - 4 threads, and with the input at an address 4 - 12 bytes off the allocator's alignment. T * B = 400 rows of x
    summed in every element (at this depth the BLAS's bits differ from the kernel's: both
    are covered); H = 136 gives tiles of rows with a tail, an input of 600 a tile of 512
    columns and one of 88."""
    x, grad = torch.randn(25, 16, 600), torch.randn(25, 16, 272)
    ref32, theirs, exact = _float64_and_torch(cls, x, grad, 600, 136, num_layers=2,
                                              bidirectional=True)
    module = pyrnn.convert(ref32)
    old = torch.get_num_threads()
    try:
        _C.set_blas_products(mode)
        ours = _run(module, x, None, grad)
        _assert_near(ours, theirs, exact)
        for n in (1, 3, 4):
            torch.set_num_threads(n)
            again = _run(module, x, None, grad)
            assert all(torch.equal(a, b) for a, b in zip(ours, again)), n
        torch.set_num_threads(old)
        for off in (1, 2, 3):
            shifted = torch.empty(x.numel() + off)[off:].view(x.shape).copy_(x)
            again = _run(module, shifted, None, grad)
            assert all(torch.equal(a, b) for a, b in zip(ours, again)), off
    finally:
        torch.set_num_threads(old)
        _C.set_blas_products(-1)
    assert _C.blas_products() == -1


@pytest.mark.parametrize("mode", [0, 1], ids=["pyrnn", "blas"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_input_products_on_either_product(cls, mode):
    """The float32 input projection x @ W_ih^T + b_ih and dX over all T*B rows run on
    pyrnn's kernel (mode 0) or on MKL's packed product in fixed tiles of rows, one
    sequential call each (mode 1, where libtorch's BLAS is MKL; the default on Intel CPUs
    from 2^30 flops). A batch of 7 keeps the projection out of the time loop on every CPU;
    T * B = 707 rows make two tiles, the second one row short. Against float64 within
    twice torch.nn's float32 error plus 8 ulps of the largest value, in inference and in
    training; bitwise the same on 1 - 4 threads. At a batch of 9, where an inference may
    project in the loop, its output has the bits of the training's forward (an Elman
    cell's training projects before the loop)."""
    x, grad = torch.randn(101, 7, 600), torch.randn(101, 7, 136)
    ref32, theirs, exact = _float64_and_torch(cls, x, grad, 600, 136)
    module = pyrnn.convert(ref32)
    old = torch.get_num_threads()
    try:
        _C.set_blas_products(mode)
        with torch.no_grad():
            inferred = module(x)[0]
        ours = _run(module, x, None, grad)
        _assert_near([inferred] + ours, theirs[:1] + theirs, exact[:1] + exact)
        for n in (1, 3, 4):
            torch.set_num_threads(n)
            with torch.no_grad():
                assert torch.equal(module(x)[0], inferred), n
            again = _run(module, x, None, grad)
            assert all(torch.equal(a, b) for a, b in zip(ours, again)), n
        x9 = torch.randn(80, 9, 600)
        with torch.no_grad():
            inferred = module(x9)[0]
        assert torch.equal(inferred, module(x9.requires_grad_())[0].detach())
    finally:
        torch.set_num_threads(old)
        _C.set_blas_products(-1)


def test_set_blas_products_checks_its_argument():
    with pytest.raises(RuntimeError, match=r"expected 1 \(the BLAS\), 0 .* got 2"):
        _C.set_blas_products(2)


def test_set_gemm_rows_checks_its_argument():
    with pytest.raises(RuntimeError, match="expected 1 - 12 rows .*got 13"):
        _C.set_gemm_rows(13)


def test_info_names_the_capability():
    r = _python(["-m", "pyrnn", "info"])
    assert f"CPU loops: {_C.cpu_capability()}" in r.stdout
    units = "bfloat16: the matrix units (oneDNN's brgemm)"
    assert (units in r.stdout) == (_C.cpu_capability() == "avx512_amx"), r.stdout
    intel = os.path.exists("/proc/cpuinfo") and "GenuineIntel" in open("/proc/cpuinfo").read()
    # (the float32 products' default on Intel CPUs, in a build with the BLAS)
    assert ("weight gradients of 2^24 flops or more on libtorch sgemm_" in r.stdout) == (
        intel and "float64: libtorch dgemm_" in r.stdout), r.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _C.cpu_capability_error() == ""


def _functions_using(so, pattern):
    """Names of the functions in the shared object whose code (a line of objdump's
    disassembly) matches the regex pattern: a register or an instruction."""
    import re
    r = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True,
                       text=True, check=True)
    found, name, reg = set(), None, re.compile(pattern)
    for line in r.stdout.splitlines():
        if line.endswith(">:"):
            name = line[line.index("<") + 1:-2]
        elif name and reg.search(line):
            found.add(name)
    return found


@pytest.mark.skipif(_C.baseline_isa() != "x86-64" or not shutil.which("objdump"),
                    reason="needs an x86-64 baseline build (PYRNN_MARCH unset) and objdump")
def test_only_the_copies_use_avx():
    """Outside the copies for AVX2 and AVX-512, no function of pyrnn._C uses a 256- or
    512-bit register: a CPU without them runs the library on the default copy (and the
    copies share no symbol through which the linker could mix them up)."""
    avx = _functions_using(_C.__file__, r"%[yz]mm")
    assert any("pyrnn_isa_avx2" in f for f in avx) and any("pyrnn_isa_avx512" in f for f in avx)
    outside = sorted(f for f in avx if "pyrnn_isa_avx2" not in f and "pyrnn_isa_avx512" not in f)
    assert outside == [], outside[:10]


@pytest.mark.skipif(_C.baseline_isa() != "x86-64" or not shutil.which("objdump"),
                    reason="needs an x86-64 baseline build (PYRNN_MARCH unset) and objdump")
def test_only_the_bf16_copy_uses_bf16_instructions():
    """vdpbf16ps (and any other AVX512-BF16 instruction) appears in the avx512_bf16 copy
    and nowhere else: an AVX-512 CPU without BF16 runs the avx512 copy safely."""
    bf16 = _functions_using(_C.__file__, r"\s(vdpbf16ps|vcvtne2?ps2bf16)\s")
    assert any("pyrnn_isa_avx512_bf16" in f for f in bf16)
    outside = sorted(f for f in bf16 if "pyrnn_isa_avx512_bf16" not in f)
    assert outside == [], outside[:10]
