"""The training loop: resume after a real kill is bitwise identical to an uninterrupted run,
data-parallel training under torchrun keeps ranks identical, checkpoints are atomic."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TRAIN_SCRIPT = r"""
import sys, time, torch
import vlood_fast.loop as loop
from vlood_fast.synthetic import make_feature_world, WorldTextModel
from vlood_fast.train import train_ogen, TrainConfig

out, final, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
if slow:  # give the test time to kill us mid-run
    step = torch.optim.SGD.step
    def slow_step(self, *a, **k):
        time.sleep(slow)
        return step(self, *a, **k)
    torch.optim.SGD.step = slow_step
world = make_feature_world(seed=0)
x, y = world.sample(8, classes=range(world.num_base), seed=2)
config = TrainConfig(epochs=6, batch_size=16, out_dir=out, resume=True, progress=False, seed=3)
result = train_ogen(x, y, WorldTextModel(world), world.num_base, config=config, m_min=1, m_max=3)
torch.save({k: m.state_dict() for k, m in result.modules.items()}, final)
"""


def _run(tmp, name, slow=0.0, wait=True):
    script = tmp / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, str(script), str(tmp / name), str(tmp / f"{name}.pt"), str(slow)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return proc


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        elif isinstance(a[key], list):
            assert len(a[key]) == len(b[key]), key
            for x, y in zip(a[key], b[key]):
                _assert_same_state(x, y) if isinstance(x, dict) else None
        else:
            assert a[key] == b[key], key


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    _run(tmp_path, "straight")
    victim = _run(tmp_path, "killed", slow=0.02, wait=False)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6, f"the run was not interrupted mid-training ({done} epochs logged)"
    _run(tmp_path, "killed")  # resumes from last.pt
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    resumed = torch.load(tmp_path / "killed.pt", weights_only=False)
    _assert_same_state(straight, resumed)
    logged = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [m["epoch"] for m in logged] == list(range(6))  # no duplicated or missing epochs


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from vlood_fast import loop
    target = tmp_path / "ckpt.pt"
    loop.atomic_save({"v": torch.ones(3)}, target)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(loop.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        loop.atomic_save({"v": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["v"], torch.ones(3))  # the old file survives whole
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]   # no temporary left behind


def test_torchrun_data_parallel_keeps_ranks_identical(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(ROOT / "examples" / "train_distributed.py"), "--epochs", "2",
                          "--out", str(tmp_path / "run"), "--report", str(report)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result == {**result, "world_size": 2, "identical": True}
    assert (tmp_path / "run" / "best.pt").exists()
