"""Every script in examples/ runs (small settings) and prints what it promises."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_croft_in_open_clip_loop():
    out = run_example("croft_in_open_clip_loop.py")
    assert out.count("open-set AUROC") == 3 and "edr" in out


def test_ogen_prompt_learning():
    out = run_example("ogen_prompt_learning.py")
    lines = [l for l in out.splitlines() if l.startswith("epoch")]
    assert len(lines) == 5
    assert "ce_new" in lines[-1] and "distill" in lines[-1]  # after the warm-up, with the teacher


def test_score_open_set():
    out = run_example("score_open_set.py")
    assert "AUROC" in out and "FPR95" in out


def test_replace_energy_penalty():
    out = run_example("replace_energy_penalty.py", "--batch", "64", "--classes", "300", "--dim", "64")
    assert "|difference| " in out and "relative difference" in out
    rel = float(out.split("relative difference")[1].split()[0])
    assert rel < 1e-5  # the closed form agrees with the double backward


def test_every_example_is_tested():
    tested = {"croft_in_open_clip_loop.py", "ogen_prompt_learning.py", "score_open_set.py",
              "replace_energy_penalty.py", "train_distributed.py"}  # the last one: test_training.py
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
