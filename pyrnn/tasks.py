"""The pathological long-term-dependency problems of Hochreiter and Schmidhuber (1997), in
the form Martens and Sutskever (2011) and Pascanu, Mikolov and Bengio (2013) train on.

Each task draws batches [L, B, input_size] (time first) from a torch.Generator, so a seed
fixes the data. T is the task's length parameter. Random positions are drawn
independently per sequence; "in [a T, b T)" means an integer position in
[int(a L), int(a L) + int(0.1 L)), as in the original generators.

adding
    Inputs: two channels; channel 0 holds values uniform in [0, 1), channel 1 marks two
    positions with 1 (0 elsewhere). The length L of a batch is T + U{0, ..., int(T/10) - 1}
    (drawn once per batch). The first marker lies in [0, 0.1 L), the second in
    [0.1 L, 0.5 L). Target: the mean of the two marked values, read at the last step
    (regression, squared error). Predicting the mean 0.5 gives MSE 1/24 = 0.042.
    Success: test MSE below 0.01.
    ``variant="sum"`` is the version of Le, Jaitly and Hinton (2015) that ``pyrnn adding``
    uses by default: length T, one marker in each half, the target the sum (always
    answering 1 gives MSE 1/6 = 0.167); success there is an MSE below a tenth of that.
multiplication
    As adding, with the product of the two marked values as target. Predicting its mean
    0.25 gives MSE 7/144 = 0.049. Success: test MSE below 0.01.
temporal-order
    Six symbols, one-hot: A, B (relevant) and c, d, e, f (distractors). Length T; every
    step holds a random distractor except one position in [0.1 T, 0.2 T) and one in
    [0.5 T, 0.6 T), which hold A or B. Target at the last step: the order seen, one of
    AA, AB, BA, BB (class v0 + 2 v1 with A = 0, B = 1; softmax cross-entropy). Chance:
    75% error. Success: test error (misclassified sequences) below 1%.
temporal-order-3bit
    As temporal-order with three relevant positions, in [0.1 T, 0.2 T), [0.3 T, 0.4 T) and
    [0.6 T, 0.7 T): eight classes v0 + 2 v1 + 4 v2. Chance: 87.5% error. Success: below 1%.
permutation
    100 symbols, one-hot, length T. The first symbol is 0 or 1, the others are drawn from
    2..99. Target at the last step: the first symbol (a softmax over the 100 symbols).
    Chance: 50% error. Success: test error below 1%.
memorisation (noiseless)
    Five symbols and two control channels (blank, trigger): 7 inputs. The first 10 steps
    show 10 random symbols, then T steps of blank, then the trigger, then 9 blanks
    (L = T + 20). Target at every step: "blank" (class 5) for the first T + 10 steps,
    then the 10 symbols in the order shown (6 classes, cross-entropy over all steps).
    Success: fewer than 1% of the recalled symbols wrong (the blank outputs, which any
    network learns at once, are left out of the error).
"""
import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor
import torch.nn.functional as F

TASKS = ("adding", "multiplication", "temporal-order", "temporal-order-3bit", "permutation",
         "memorisation")

MEM_SYMBOLS, MEM_POSITIONS = 5, 10
PERM_SYMBOLS = 100


def _positions(L: int, start: float, B: int, gen: torch.Generator, width: float = 0.1) -> Tensor:
    """B positions uniform in [int(start L), int(start L) + max(int(width L), 1))."""
    lo, n = int(start * L), max(int(width * L), 1)
    return lo + torch.randint(0, n, (B,), generator=gen)


def _two_markers(T: int, B: int, gen: torch.Generator, variant: str):
    """(x [L, B, 2], first marked value, second marked value). Channel 0 holds the values,
    channel 1 the markers."""
    if variant == "sum":
        L = T
        values = torch.rand(L, B, generator=gen)
        half = max(T // 2, 1)
        p0 = torch.randint(0, half, (B,), generator=gen)
        p1 = torch.randint(half, T, (B,), generator=gen) if T > 1 else p0
    else:
        L = T + int(torch.randint(0, max(int(0.1 * T), 1), (1,), generator=gen))
        values = torch.rand(L, B, generator=gen)
        p0 = _positions(L, 0.0, B, gen)
        p1 = _positions(L, 0.1, B, gen, width=0.4)
    marks = torch.zeros(L, B)
    idx = torch.arange(B)
    marks[p0, idx] = 1.0
    marks[p1, idx] = 1.0
    return torch.stack([values, marks], 2), values[p0, idx], values[p1, idx]


def adding(T: int, B: int, gen: torch.Generator, variant: str = "mean") -> Tuple[Tensor, Tensor]:
    """Adding problem: (x [L, B, 2] (value, marker), target [B])."""
    if variant not in ("mean", "sum"):
        raise ValueError(f"variant: expected 'mean' or 'sum', got {variant!r}")
    x, a, b = _two_markers(T, B, gen, variant)
    return x, (a + b if variant == "sum" else (a + b) / 2)


def multiplication(T: int, B: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Multiplication problem: (x [L, B, 2] (value, marker), target [B] = product)."""
    x, a, b = _two_markers(T, B, gen, "mean")
    return x, a * b


def _one_hot_seq(symbols: Tensor, n: int) -> Tensor:
    return F.one_hot(symbols, n).to(torch.get_default_dtype())


def temporal_order(T: int, B: int, gen: torch.Generator, bits: int = 2) -> Tuple[Tensor, Tensor]:
    """Temporal order with ``bits`` relevant symbols (2 or 3): (x [T, B, 6], class [B])."""
    starts = {2: (0.1, 0.5), 3: (0.1, 0.3, 0.6)}[bits]
    sym = torch.randint(2, 6, (T, B), generator=gen)
    idx = torch.arange(B)
    target = torch.zeros(B, dtype=torch.long)
    for k, s in enumerate(starts):
        p = _positions(T, s, B, gen)
        v = torch.randint(0, 2, (B,), generator=gen)
        sym[p, idx] = v
        target += v << k
    return _one_hot_seq(sym, 6), target


def permutation(T: int, B: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Random permutation problem: (x [T, B, 100], class [B] = the first symbol, 0 or 1)."""
    sym = torch.randint(2, PERM_SYMBOLS, (T, B), generator=gen)
    first = torch.randint(0, 2, (B,), generator=gen)
    sym[0] = first
    return _one_hot_seq(sym, PERM_SYMBOLS), first


def memorisation(T: int, B: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Noiseless memorisation: (x [T + 20, B, 7], classes [T + 20, B]; class 5 = blank)."""
    n, k = MEM_SYMBOLS, MEM_POSITIONS
    L = T + 2 * k
    sym = torch.randint(0, n, (k, B), generator=gen)
    x = torch.zeros(L, B, n + 2)
    x[:k] = _one_hot_seq(sym, n + 2)
    x[k:, :, n] = 1.0          # blank
    x[T + k, :, n] = 0.0
    x[T + k, :, n + 1] = 1.0   # trigger
    y = torch.full((L, B), n, dtype=torch.long)
    y[L - k:] = sym
    return x, y


@dataclass
class Task:
    """A task: its data, its loss on the network's outputs, its error and success bound."""

    name: str
    input_size: int
    output_size: int
    kind: str                  # "regression" (last step), "class" (last step), "sequence"
    generate: Callable         # (T, B, generator) -> (x, target)
    threshold: float           # success: error below this
    error_name: str            # what the error is

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        """out: the head's outputs [L, B, output_size] (all steps)."""
        if self.kind == "regression":
            return F.mse_loss(out[-1, :, 0], target)
        if self.kind == "class":
            return F.cross_entropy(out[-1], target)
        return F.cross_entropy(out.flatten(0, 1), target.flatten())

    @torch.no_grad()
    def error(self, out: Tensor, target: Tensor) -> float:
        """The error that decides success: MSE, or the fraction misclassified (memorisation:
        of the recalled symbols)."""
        if self.kind == "regression":
            return F.mse_loss(out[-1, :, 0], target).item()
        if self.kind == "class":
            return (out[-1].argmax(-1) != target).double().mean().item()
        k = MEM_POSITIONS
        return (out[-k:].argmax(-1) != target[-k:]).double().mean().item()


def get(name: str, variant: str = "mean") -> Task:
    """The Task called ``name`` (one of TASKS)."""
    if name == "adding":
        if variant == "sum":
            return Task(name, 2, 1, "regression", lambda T, B, g: adding(T, B, g, "sum"),
                        1 / 60, "MSE")
        return Task(name, 2, 1, "regression", lambda T, B, g: adding(T, B, g, variant), 0.01,
                    "MSE")
    if name == "multiplication":
        return Task(name, 2, 1, "regression", multiplication, 0.01, "MSE")
    if name == "temporal-order":
        return Task(name, 6, 4, "class", lambda T, B, g: temporal_order(T, B, g, 2), 0.01,
                    "error rate")
    if name == "temporal-order-3bit":
        return Task(name, 6, 8, "class", lambda T, B, g: temporal_order(T, B, g, 3), 0.01,
                    "error rate")
    if name == "permutation":
        return Task(name, PERM_SYMBOLS, PERM_SYMBOLS, "class", permutation, 0.01, "error rate")
    if name == "memorisation":
        return Task(name, MEM_SYMBOLS + 2, MEM_SYMBOLS + 1, "sequence", memorisation, 0.01,
                    "error rate on the recalled symbols")
    raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")


@dataclass
class Result:
    """The outcome of one training run."""

    task: str
    T: int
    success: bool              # the test error fell below the task's threshold
    steps: int                 # updates made (the first one at which it succeeded, if stopped)
    error: float               # last test error
    seconds: float
    curve: list                # [(step, train loss, test error)]
    flows: dict                # {"start"/"end": recorded ||dLoss/dh_t|| [L*D, T, B]}
    diverged: bool = False     # the training loss or the test error became inf or NaN


def make_module(cell: str, input_size: int, hidden: int, **kw):
    """A pyrnn recurrent module for a cell of the registry (pyrnn.ops.CELLS): rnn_<act> as
    pyrnn.RNN(nonlinearity=<act>), lstm, gru, ln_lstm as pyrnn.LayerNormLSTM."""
    import pyrnn
    from pyrnn import ops
    if cell not in ops.CELLS:
        raise ValueError(f"cell: expected one of {', '.join(ops.CELLS)}, got {cell!r}")
    if cell.startswith("rnn_"):
        return pyrnn.RNN(input_size, hidden, nonlinearity=cell[4:], **kw)
    modules = {"lstm": pyrnn.LSTM, "gru": pyrnn.GRU, "ln_lstm": pyrnn.LayerNormLSTM}
    return modules[cell](input_size, hidden, **kw)


INITS = ("default", "identity", "orthogonal", "forget-bias", "chrono")


def initialise(rnn, scheme: str, radius: float = 0.0, t_max: float = 0.0):
    """Apply one of INITS (then, if radius > 0, scale W_hh's blocks to that spectral
    radius) to a recurrent module."""
    from . import init
    if scheme == "identity":
        init.identity_(rnn)
    elif scheme == "orthogonal":
        init.orthogonal_(rnn)
    elif scheme == "forget-bias":
        init.forget_bias_(rnn, 1.0)
    elif scheme == "chrono":
        init.chrono_(rnn, t_max)
    elif scheme != "default":
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {scheme!r}")
    if radius > 0:
        init.spectral_radius_(rnn, radius)
    return rnn


def train(name: str, cell: str = "rnn_tanh", T: int = 50, steps: int = 5000, batch: int = 20,
          hidden: int = 50, optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.9,
          clip: float = 0.0, bptt_clip: float = 0.0, penalty: float = 0.0,
          init: str = "default", radius: float = 0.0, eval_every: int = 100,
          test_size: int = 1000, seed: int = 0, stop_on_success: bool = True,
          variant: str = "mean", progress=None, log=None) -> Result:
    """Train ``cell`` (with a linear read-out) on task ``name`` at length T.

    Plain SGD with momentum by default (``optimizer="adam"`` for Adam); ``clip`` rescales
    the whole gradient to that norm when it is larger (Pascanu et al. 2013, algorithm 1);
    ``bptt_clip`` clamps the gate gradients inside BPTT; ``penalty`` is the module's
    vanishing_penalty (the regulariser of Pascanu et al., Elman cells). The test set
    (``test_size`` sequences) is fixed by the seed; it is evaluated every ``eval_every``
    updates, and training stops at the first evaluation below the task's threshold when
    ``stop_on_success``. ``progress(step, note)`` and ``log(line)`` are optional callbacks.
    """
    import time
    task = get(name, variant)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    kw = dict(bptt_clip=bptt_clip, record_grad_norms=True)
    if penalty:
        kw["vanishing_penalty"] = penalty
    rnn = make_module(cell, task.input_size, hidden, **kw)
    initialise(rnn, init, radius, t_max=T)
    head = torch.nn.Linear(hidden, task.output_size)
    params = list(rnn.parameters()) + list(head.parameters())
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        raise ValueError(f"optimizer: expected 'sgd' or 'adam', got {optimizer!r}")
    test_x, test_y = task.generate(T, test_size, torch.Generator().manual_seed(seed + 1))
    curve, flows = [], {}
    t0 = time.time()
    err, success, diverged, step, running = float("nan"), False, False, 0, []
    for step in range(1, steps + 1):
        x, y = task.generate(T, batch, gen)
        out, _ = rnn(x)
        loss = task.loss(head(out), y)
        opt.zero_grad()
        loss.backward()
        if step == 1:
            flows["start"] = rnn.grad_norms.hidden.clone()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        running.append(loss.item())
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                err = task.error(head(rnn(test_x)[0]), test_y)
            train_loss = sum(running) / len(running)
            running = []
            curve.append((step, train_loss, err))
            if log is not None:
                log(f"step {step:6d}  train loss {train_loss:.4f}  test {task.error_name} "
                    f"{err:.4f}")
            if err < task.threshold:
                success = True
                if stop_on_success:
                    if progress is not None:
                        progress(step, f"test {err:.4f}")
                    break
            # A classifier's error stays finite when its outputs are NaN (argmax picks a
            # class), so the training loss is checked too.
            if not (math.isfinite(err) and math.isfinite(train_loss)):
                diverged = True
                break
        if progress is not None:
            progress(step, f"test {err:.4f}" if curve else "")
    flows["end"] = rnn.grad_norms.hidden.clone()
    return Result(name, T, success, step, err, time.time() - t0, curve, flows, diverged)
