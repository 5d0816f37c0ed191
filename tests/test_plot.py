"""``gvm-mega plot``: a real PNG from run directories, and clear errors for bad ones."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from gvm_mega.cli import main
from gvm_mega.config import load_config
from gvm_mega.runlog import RunLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two line colours


def _make_run(path, slope: float, iterations: int = 5, allocations: bool = True,
              variance: bool = False) -> None:
    cfg = load_config(None, [f"train.iterations={iterations}", "logging.tensorboard=false"])
    with RunLogger.start(cfg, path, console=open(os.devnull, "w")) as run:
        run.log_iteration({"iteration": 0, "samples_total": 0, "eval_accuracy": 0.2})
        for it in range(1, iterations + 1):
            last = it == iterations
            run.log_iteration({"iteration": it, "samples_total": 128 * it,
                               "accept_rate_mean": 0.2 + slope * it,
                               "eval_accuracy": 0.2 + slope * it if last else None,
                               **({"variance_ratio": 0.9 - 0.1 * it,
                                   "variance_ratio_best": 0.8 - 0.1 * it} if variance else {})})
            if allocations:
                run.log_allocation(it, {f"p{j}": (j * it) % 9 for j in range(16)})


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_two_runs_writes_a_png_with_one_line_per_run(tmp_path):
    _make_run(tmp_path / "uniform", 0.02)
    _make_run(tmp_path / "gvm", 0.05, variance=True)
    out = tmp_path / "figs" / "curves.png"
    done = subprocess.run([sys.executable, "-m", "gvm_mega", "plot", str(tmp_path / "uniform"),
                           str(tmp_path / "gvm"), "--out", str(out), "--title", "demo"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    data = out.read_bytes()
    width, height = _png_size(data)
    assert (width, height) == (1200, 800) and len(data) > 20_000
    from PIL import Image

    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 24)}
    assert C0 in colours and C1 in colours  # both runs drawn
    assert len(colours) > 50  # text, grids, lines: not a blank canvas


def test_plot_reads_the_variance_ratios_of_gvm_runs(tmp_path):
    from gvm_mega.cli.plot import load_run

    _make_run(tmp_path / "gvm", 0.05, iterations=3, variance=True)
    _make_run(tmp_path / "uniform", 0.05, iterations=3)
    gvm = load_run(str(tmp_path / "gvm"), "gvm")
    assert gvm.variance_it == [1, 2, 3]
    assert gvm.variance == pytest.approx([0.8, 0.7, 0.6])
    assert gvm.variance_best == pytest.approx([0.7, 0.6, 0.5])
    assert load_run(str(tmp_path / "uniform"), "uniform").variance == []


def test_plot_default_output_and_run_without_allocations(tmp_path, capsys):
    _make_run(tmp_path / "raft", 0.03, iterations=2, allocations=False)
    assert main(["plot", str(tmp_path / "raft")]) == 0
    assert _png_size((tmp_path / "raft" / "curves.png").read_bytes())[0] == 1200
    assert "curves.png" in capsys.readouterr().out


def _fails(capsys, *args: str) -> str:
    assert main(["plot", *args]) == 2
    return capsys.readouterr().err


def test_plot_errors_name_the_file_and_line(tmp_path, capsys):
    good = tmp_path / "good"
    _make_run(good, 0.05, iterations=2)
    assert "not a directory" in _fails(capsys, str(tmp_path / "nope"))
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    err = _fails(capsys, str(good), str(empty_dir))
    assert f"{empty_dir / 'metrics.jsonl'}: no such file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("\n")
    assert f"{empty / 'metrics.jsonl'}: no records" in _fails(capsys, str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text(
        json.dumps({"iteration": 0, "samples_total": 0}) + "\n" + '{"iteration": 1, "samp\n')
    assert f"{broken / 'metrics.jsonl'}:2: not valid JSON" in _fails(capsys, str(broken))
    bad_alloc = tmp_path / "bad_alloc"
    _make_run(bad_alloc, 0.05, iterations=2)
    with open(bad_alloc / "allocations.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 7, "samples": {"p0": "many"}}) + "\n")
    assert "allocations.jsonl: last row (iteration 7)" in _fails(capsys, str(bad_alloc))
    no_x = tmp_path / "no_x"
    no_x.mkdir()
    (no_x / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "loss": 1.0}) + "\n")
    assert "nothing to plot" in _fails(capsys, str(no_x))
    assert "must be a .png" in _fails(capsys, str(good), "--out", str(tmp_path / "x.pdf"))


@pytest.mark.parametrize("argv", [["plot", "--help"], ["eval", "--help"]])
def test_commands_are_registered(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage: gvm-mega " + argv[0] in capsys.readouterr().out
