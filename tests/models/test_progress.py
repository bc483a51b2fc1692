"""Training progress off a terminal is a few plain lines, not hundreds of redraws.

``seqstream train`` runs as a real process with stderr to a file (as the demo and
systemd do); on a terminal (a pseudo-terminal here) the tqdm bar stays.
"""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np

from models.progress import PlainProgress, progress


def test_plain_progress_writes_a_start_about_ten_lines_and_the_end() -> None:
    out = io.StringIO()
    bar = progress(range(200), desc="train lstm", stream=out)
    assert isinstance(bar, PlainProgress)
    for epoch in bar:
        bar.set_postfix(loss=f"{1 / (epoch + 1):.4f}")
        if epoch == 136:  # early stopping
            break
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "train lstm: up to 200 epochs"
    assert 5 <= len(lines) <= 12
    assert lines[-1].startswith("train lstm: epoch 137/200 loss=0.0073")
    assert lines[1].startswith("train lstm: epoch 20/200 ")


def test_a_terminal_gets_the_bar() -> None:
    controller, terminal = pty.openpty()
    try:
        with os.fdopen(terminal, "w", closefd=False) as tty:
            assert not isinstance(progress(range(3), desc="x", stream=tty), PlainProgress)
    finally:
        os.close(controller)
        os.close(terminal)


def test_train_logs_plain_lines_to_a_file(tmp_path: Path) -> None:
    t = np.arange(120) * 0.1
    rows = "\n".join(f"{a:.2f},{np.sin(a):.4f}" for a in t)
    (tmp_path / "d.csv").write_text("time,x\n" + rows + "\n")
    log = tmp_path / "train.log"
    with log.open("w") as err:
        proc = subprocess.run(
            [
                sys.executable, "-m", "pipeline.cli", "train", "--task", "forecast",
                "--data", str(tmp_path / "d.csv"), "--time-column", "time", "--hidden", "4",
                "--layers", "1", "--epochs", "6", "--patience", "100", "--window", "16",
                "--out", str(tmp_path / "run"),
            ],
            stdout=subprocess.DEVNULL, stderr=err, timeout=300, check=False,
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("train lstm")]
    assert lines[0] == "train lstm: up to 6 epochs"
    assert lines[-1].startswith("train lstm: epoch 6/6 loss=")
    assert len(lines) == 7  # the start and one per epoch: fewer than 10 epochs
