"""The command line: python -m pyrnn {info, gradflow, task, adding}, with tiny settings."""
import os
import subprocess
import sys

import pytest

import pyrnn
from pyrnn.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib", reason="the PNG output needs matplotlib (pip install pyrnn[plot])")


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and path.stat().st_size > 1000


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: cpu" in out


def test_gradflow_table_and_plots(tmp_path, capsys):
    assert main(["gradflow", "--T", "5,12", "--batch", "3", "--hidden", "8",
                 "--input-size", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for cell in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
        rows = [l for l in out.splitlines() if l.startswith(cell)]
        assert len(rows) == 2, out
        assert _is_png(tmp_path / f"gradflow_{cell}.png")


def test_adding_runs_and_plots(tmp_path, capsys):
    assert main(["adding", "--cell", "gru", "--T", "10", "--steps", "20", "--batch", "8",
                 "--hidden", "8", "--eval-every", "10", "--bptt-clip", "1.0",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "adding (T 10)" in out and "adam" in out and "result:" in out
    assert _is_png(tmp_path / "adding_gru_T10_s0.png")


@pytest.mark.parametrize("name", ["adding", "multiplication", "temporal-order",
                                  "temporal-order-3bit", "permutation", "memorisation"])
def test_task_runs_and_plots(name, tmp_path, capsys):
    assert main(["task", name, "--T", "12", "--steps", "6", "--batch", "4", "--hidden", "8",
                 "--eval-every", "3", "--test-size", "16", "--clip", "1.0",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("step ")]
    assert len(lines) == 2, out  # evaluations at updates 3 and 6
    assert "result:" in out and "sgd lr 0.01 momentum 0.9" in out
    assert _is_png(tmp_path / f"{name}_rnn_tanh_T12_s0.png")


def test_task_seed_fixes_the_run(capsys):
    argv = ["task", "temporal-order", "--T", "10", "--steps", "4", "--batch", "4",
            "--hidden", "6", "--eval-every", "2", "--test-size", "8", "--out", ""]
    runs = []
    for seed in ("3", "3", "4"):
        main(argv + ["--seed", seed])
        runs.append([l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def _options(parser):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {o}", h) for o, h in _options(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_option_has_help():
    from pyrnn.__main__ import build_parser
    opts = list(_options(build_parser()))
    assert len(opts) > 30
    missing = [o for o, h in opts if not h]
    assert not missing, missing


def test_module_entry_point(tmp_path):
    # from an empty directory, so that `-m` finds the package this process imported (the
    # installed one, or an in-place build), not a source tree without its _C
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pyrnn.__file__)))
    res = subprocess.run([sys.executable, "-m", "pyrnn", "info"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0 and "pyrnn" in res.stdout
