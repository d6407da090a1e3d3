"""pyrnn.tasks: the data generators build what the definitions say, and the errors score it."""
import math

import pytest
import torch
import torch.nn.functional as F

from pyrnn import tasks


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _one_hot_ok(x):
    return bool(((x == 0) | (x == 1)).all() and (x.sum(-1) == 1).all())


@pytest.mark.parametrize("T", [10, 50, 200])
def test_adding_mean(T):
    B = 64
    for seed in range(5):
        x, y = tasks.adding(T, B, _gen(seed))
        L = x.shape[0]
        assert T <= L < T + max(T // 10, 1) and x.shape[1:] == (B, 2) and y.shape == (B,)
        marks, values = x[..., 1], x[..., 0]
        assert (marks.sum(0) == 2).all() and ((values >= 0) & (values < 1)).all()
        pos = marks.t().nonzero()[:, 1].view(B, 2)
        lo = int(0.1 * L)
        assert (pos[:, 0] < lo).all()
        assert ((pos[:, 1] >= lo) & (pos[:, 1] < lo + int(0.4 * L))).all()
        torch.testing.assert_close(y, (values * marks).sum(0) / 2, atol=1e-6, rtol=0)


def test_adding_sum_variant():
    T, B = 30, 50
    x, y = tasks.adding(T, B, _gen(), variant="sum")
    marks, values = x[..., 1], x[..., 0]
    assert x.shape == (T, B, 2)
    assert (marks[:T // 2].sum(0) == 1).all() and (marks[T // 2:].sum(0) == 1).all()
    torch.testing.assert_close(y, (values * marks).sum(0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="variant"):
        tasks.adding(T, B, _gen(), variant="max")


def test_multiplication():
    x, y = tasks.multiplication(40, 32, _gen())
    marks, values = x[..., 1], x[..., 0]
    prod = torch.where(marks == 1, values, torch.ones_like(values)).prod(0)
    torch.testing.assert_close(y, prod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,mean,var", [("adding", 0.5, 1 / 24),
                                           ("multiplication", 0.25, 7 / 144)])
def test_regression_baselines(name, mean, var):
    # The MSE of always predicting the mean, as stated in the docstrings: the sample
    # variance of n targets is within 6 standard errors (4th moment / n) of var.
    n = 40000
    _, y = tasks.get(name).generate(20, n, _gen(3))
    se = (((y - mean) ** 2 - var).pow(2).mean() / n).sqrt().item()
    assert abs(((y - mean) ** 2).mean().item() - var) < 6 * se
    assert abs(y.mean().item() - mean) < 6 * (var / n) ** 0.5


@pytest.mark.parametrize("bits,starts", [(2, (0.1, 0.5)), (3, (0.1, 0.3, 0.6))])
@pytest.mark.parametrize("T", [10, 57, 200])
def test_temporal_order(bits, starts, T):
    B = 128
    x, y = tasks.temporal_order(T, B, _gen(T), bits)
    assert x.shape == (T, B, 6) and y.shape == (B,) and _one_hot_ok(x)
    sym = x.argmax(-1)                     # [T, B]
    relevant = sym < 2
    assert (relevant.sum(0) == bits).all()
    for b in range(B):
        pos = relevant[:, b].nonzero().flatten()
        cls = 0
        for k, (p, s) in enumerate(zip(pos.tolist(), starts)):
            lo = int(s * T)
            assert lo <= p < lo + max(int(0.1 * T), 1)
            cls += int(sym[p, b]) << k
        assert cls == int(y[b])
    assert set(y.tolist()) == set(range(2 ** bits))  # every class occurs in 128 draws


def test_permutation():
    T, B = 30, 64
    x, y = tasks.permutation(T, B, _gen())
    assert x.shape == (T, B, 100) and _one_hot_ok(x)
    sym = x.argmax(-1)
    assert torch.equal(sym[0], y) and (y <= 1).all() and (sym[1:] >= 2).all()


def test_memorisation():
    T, B = 15, 32
    x, y = tasks.memorisation(T, B, _gen())
    L, k = T + 20, 10
    assert x.shape == (L, B, 7) and y.shape == (L, B) and _one_hot_ok(x)
    sym = x.argmax(-1)
    assert (sym[:k] < 5).all()
    assert (sym[k:T + k] == 5).all() and (sym[T + k] == 6).all() and (sym[T + k + 1:] == 5).all()
    assert (y[:T + k] == 5).all() and torch.equal(y[T + k:], sym[:k])


@pytest.mark.parametrize("name", tasks.TASKS)
def test_error_scores_right_and_wrong_outputs(name):
    task = tasks.get(name)
    x, y = task.generate(20, 16, _gen())
    L = x.shape[0]
    if task.kind == "regression":
        right = y.view(1, -1, 1).expand(L, -1, 1)
        assert task.error(right, y) == 0 and task.loss(right, y).item() == 0
        assert task.error(right + 0.5, y) == pytest.approx(0.25)
        return
    n = task.output_size
    labels = y if task.kind == "sequence" else y.expand(L, -1)
    right = 10.0 * F.one_hot(labels, n).double()
    wrong = 10.0 * F.one_hot((labels + 1) % n, n).double()
    assert task.error(right, y) == 0 and task.error(wrong, y) == 1
    assert task.loss(right, y).item() < task.loss(wrong, y).item()


def test_get_rejects_unknown():
    with pytest.raises(ValueError, match="task: expected one of"):
        tasks.get("parity")


def test_train_learns_an_easy_case():
    # Temporal order at T = 10 is within reach of a small LSTM in a few hundred updates;
    # the test checks that train() can succeed and stops when it does.
    res = tasks.train("temporal-order", cell="lstm", T=10, steps=1500, batch=32, hidden=24,
                      optimizer="adam", lr=0.01, eval_every=50, test_size=400, seed=0)
    assert res.success and res.steps < 1500 and res.error < 0.01
    assert res.curve[-1][2] == res.error


def test_train_stops_when_it_diverges():
    # An infinite learning rate makes the weights inf or NaN at the first update. The
    # classifier's test error stays finite (argmax of NaN outputs picks class 0), so the stop
    # has to come from the training loss; the run is reported as diverged.
    res = tasks.train("temporal-order", T=10, steps=500, hidden=8, lr=float("inf"),
                      eval_every=50, test_size=100, seed=0)
    assert res.diverged and not res.success
    assert res.steps == 50 and not math.isfinite(res.curve[-1][1])
    ok = tasks.train("temporal-order", T=10, steps=100, hidden=8, eval_every=50,
                     test_size=100, seed=0)
    assert not ok.diverged and ok.steps == 100
