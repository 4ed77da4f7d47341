"""End to end on a randomly initialized tiny open_clip model and generated class folders:
extract -> train -> eval through the CLI, the feature cache doing each encoding once, and the
CLI's errors for bad paths, empty classes and unknown models."""
import json

import pytest

from vlood_fast.cli import main

CLASSES = ["apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "pear"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from vlood_fast.data import make_synthetic_image_folder
    root = tmp_path_factory.mktemp("images")
    make_synthetic_image_folder(root / "train", CLASSES, per_class=4, size=32, seed=0)
    make_synthetic_image_folder(root / "test", CLASSES, per_class=3, size=32, seed=1)
    make_synthetic_image_folder(root / "ood", ["rock", "cloud", "wave"], per_class=3, size=32, seed=2)
    return root


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_extract_then_reuse_the_cache(folders, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert run_cli("extract", "--model", "vlood-tiny", "--data", folders / "train", "--cache", cache, "--quiet") == 0
    first = capsys.readouterr().out
    assert "32 images, 8 classes" in first and "'misses': 1" in first
    assert run_cli("extract", "--model", "vlood-tiny", "--data", folders / "train", "--cache", cache, "--quiet") == 0
    second = capsys.readouterr().out
    assert "'hits': 1" in second and "'misses': 0" in second


def test_train_ogen_one_epoch_then_eval(folders, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "ogen", "--model", "vlood-tiny", "--train", folders / "train", "--test",
            folders / "test", "--out", run, "--epochs", "1", "--cache", tmp_path / "cache", "--quiet"]
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    assert "encoder passes this run: 2" in out  # train and test, once each
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and {"base_acc", "new_acc", "hm"} <= set(json.loads(lines[0]))
    assert run_cli("eval", "--run", run, "--data", folders / "test", "--cache", tmp_path / "cache", "--quiet") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"base_acc", "new_acc", "hm"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_extract_train_croft_eval(folders, tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "croft"
    assert run_cli("extract", "--model", "vlood-tiny", "--data", folders / "train", folders / "test",
                   "--cache", cache, "--quiet") == 0
    capsys.readouterr()
    argv = ["train", "croft", "--model", "vlood-tiny", "--train", folders / "train", "--val",
            folders / "test", "--ood", folders / "ood", "--out", run, "--epochs", "2",
            "--cache", cache, "--quiet", "--preset", "setup2"]
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    assert "encoder passes this run: 1" in out  # train and val were extracted before; ood now
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    assert {"val_acc", "ood_auroc", "ood_fpr95", "train_edr"} <= set(history[0])
    assert run_cli("eval", "--run", run, "--data", folders / "test", "--ood", folders / "ood",
                   "--cache", cache, "--quiet") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"acc", "auroc", "fpr95"} <= set(metrics)
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["auroc"] <= 1.0


def test_cli_errors_are_one_clear_line(folders, tmp_path, capsys):
    empty = tmp_path / "empty_class"
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    cases = [
        (["train", "ogen", "--model", "vlood-tiny", "--train", tmp_path / "missing", "--out", tmp_path / "r"],
         "does not exist"),
        (["train", "ogen", "--model", "no-such-model", "--train", folders / "train", "--out", tmp_path / "r"],
         "unknown model name"),
        (["extract", "--model", "vlood-tiny", "--data", empty, "--cache", tmp_path / "c"], "no images"),
        (["eval", "--run", tmp_path / "not-a-run", "--data", folders / "test"], "not a finished vlood-fast run"),
    ]
    for argv, message in cases:
        assert run_cli(*argv) == 2
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("command", [[], ["demo"], ["extract"], ["train"], ["train", "croft"],
                                     ["train", "ogen"], ["eval"], ["kernels"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: vlood-fast" in capsys.readouterr().out
