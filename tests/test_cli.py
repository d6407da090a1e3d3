"""The command line: python -m pyrnn {info, gradflow, adding}, with tiny settings."""
import subprocess
import sys

import pytest

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
    assert "final test MSE" in out and "baseline MSE" in out
    assert _is_png(tmp_path / "adding_gru_T10.png")


def test_module_entry_point(tmp_path):
    # from an empty directory, so that `-m` finds the installed package, not a source tree
    res = subprocess.run([sys.executable, "-m", "pyrnn", "info"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0 and "pyrnn" in res.stdout
