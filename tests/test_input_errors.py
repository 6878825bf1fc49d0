"""Every class of input mistake ends a command line with exit status 2 and one ``error: ...`` line,
before a process group or a model exists: train.py, lcr-eval and the heatmap tool.

Most cases call the entry points in process (``run_cli``, what each command line runs); one case per
command line runs the real process and checks that nothing but that line reaches stderr.
"""
import pytest
import yaml

from lcr_fast import train, visualize
from lcr_fast.checkpoint import save_training_checkpoint
from lcr_fast.errors import run_cli
from lcr_fast.eval import cli as eval_cli
from lcr_fast.models import build_model

from helpers import TRAIN_PY, run_command, tiny_config, write_folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_folder(root / "data", classes=3, per_class=4, size=40)  # 12 training images
    cfg = tiny_config()
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (root / "empty.yaml").write_text("")
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "folder").mkdir()
    save_training_checkpoint(root / "last.pt", build_model(cfg), None, 1, 3, cfg.to_dict())
    return root


def _train_args(root, *extra, config="tiny.yaml"):
    return ["-c", str(root / config), "--data_dir", str(root / "data"), "--log_dir", str(root / "log"),
            "--ckpt_dir", str(root / "ckpt"), "--hide_progress", *extra]


TRAIN_MISTAKES = {
    "a dataset smaller than one batch": (["train.batch_size=32"], "has 12 images, fewer than one batch"),
    "an unknown backbone": (["model.backbone=resnet51"], "model.backbone: unknown backbone 'resnet51'"),
    "a negative learning rate": (["train.base_lr=-1"], "train.base_lr must be a number above 0, got -1"),
    "a number that is text": (["train.batch_size=abc"], "train.batch_size must be an integer of at least 1"),
    "a misspelt key": (["train.batchsize=4"], "did you mean 'train.batch_size'"),
    "an override without a value": (["train.batch_size"], "is not of the form section.key=value"),
    "a value out of its choices": (["engine.precision=fp8"], "engine.precision must be one of"),
    "a section given a scalar": (["train=5"], "config key 'train' in override 'train=5' must be a mapping"),
    "a MoCo queue the batch cannot fill": (["model.name=moco", "model.moco_k=10"], "Nearby valid sizes: 4, 8, 12, 16"),
    "a name that is no file name": (["name=a/b"], "name must be a non-empty string without '/'"),
    "a missing pretrained file": (["model.pretrained=/nonexistent.pth"], "model.pretrained file '/nonexistent.pth'"),
    "--eval_from a text file": (["--eval_from", "{root}/text.pt"], "is not a PyTorch checkpoint"),
    "--resume a missing file": (["--resume", "{root}/missing.pt"], "missing.pt' does not exist"),
    "--resume a text file": (["--resume", "{root}/text.pt"], "is not a PyTorch checkpoint"),
    "a data folder that is a file": (["--data_dir", "{root}/text.pt"], "is a file, not a directory"),
    "a log folder that is a file": (["--log_dir", "{root}/text.pt"], "cannot write logs and results to"),
    "a checkpoint folder that is a file": (["--ckpt_dir", "{root}/text.pt"], "cannot write checkpoints to"),
}


@pytest.mark.parametrize("mistake", sorted(TRAIN_MISTAKES))
def test_train_input_mistakes(files, capsys, mistake):
    extra, message = TRAIN_MISTAKES[mistake]
    assert run_cli(train.main, _train_args(files, *(e.format(root=files) for e in extra))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


@pytest.mark.parametrize("config, message", [("empty.yaml", "is empty"), ("folder", "does not exist"),
                                             ("missing.yaml", "does not exist")])
def test_train_config_file_mistakes(files, capsys, config, message):
    assert run_cli(train.main, _train_args(files, config=config)) == 2
    assert message in capsys.readouterr().err


EVAL_MISTAKES = {
    "a text file as checkpoint": (["--ckpt", "{root}/text.pt"], "is not a PyTorch checkpoint"),
    "a missing checkpoint": (["--ckpt", "{root}/missing.pt"], "missing.pt' does not exist"),
    "a missing data folder": (["--data_dir", "{root}/missing"], "does not exist"),
    "CUDA on a machine without it": (["--device", "cuda"], "CUDA is not available"),
    "an unknown device": (["--device", "tpu9"], "unknown --device 'tpu9'"),
    "an empty config": (["--config", "{root}/empty.yaml"], "is empty"),
    "an output folder that is a file": (["--out", "{root}/text.pt/out"], "text.pt' is a file"),
}


@pytest.mark.parametrize("mistake", sorted(EVAL_MISTAKES))
def test_eval_input_mistakes(files, capsys, mistake):
    extra, message = EVAL_MISTAKES[mistake]
    argv = ["--ckpt", str(files / "last.pt"), "--data_dir", str(files / "data"), "--hide_progress"]
    assert eval_cli.main(argv + [e.format(root=files) for e in extra]) == 2  # later options win
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"), (["--image_size", "8"], "--image_size must be at least 32"),
    (["--num_workers", "-1"], "--num_workers must be at least 0"), (["--knn_t", "0"], "--knn_t must be above 0"),
])
def test_eval_option_mistakes_are_usage_errors(files, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        eval_cli.main(["--ckpt", str(files / "last.pt"), "--data_dir", str(files / "data"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--ckpt", "{root}/text.pt"], "is not a PyTorch checkpoint"),
    (["--split", "val"], "has no 'val' folder"),
    (["--out", "{root}/text.pt/heatmaps.png"], "cannot write the picture to"),
])
def test_visualize_input_mistakes(files, capsys, extra, message):
    argv = ["--ckpt", str(files / "last.pt"), "--data_dir", str(files / "data"), "--out", str(files / "h.png")]
    assert visualize.main(argv + [e.format(root=files) for e in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "eval", "visualize"])
def test_a_real_process_prints_one_line_and_no_traceback(files, command):
    text = str(files / "text.pt")
    argv = {"train": [TRAIN_PY, *_train_args(files, "--eval_from", text)],
            "eval": ["-m", "lcr_fast.eval", "--ckpt", text, "--data_dir", str(files / "data")],
            "visualize": ["-m", "lcr_fast.visualize", "--ckpt", text, "--data_dir", str(files / "data"),
                          "--out", str(files / "h.png")]}[command]
    proc = run_command(*argv, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: {text!r} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"]


def test_every_user_error_derives_from_one_base_that_run_cli_reports(capsys):
    import subprocess
    import sys

    from lcr_fast.checkpoint import (CheckpointLockError, CheckpointWriteError, NotACheckpointError,
                                     UnsafeCheckpointError)
    from lcr_fast.config import ConfigError
    from lcr_fast.data.folder import DatasetError
    from lcr_fast.data.prepare import PrepareError
    from lcr_fast.engine import ProcessGroupError
    from lcr_fast.errors import FallbackError, InputError, NonFiniteLossError, UserError
    from lcr_fast.launch import LaunchError

    for cls in (ConfigError, DatasetError, UnsafeCheckpointError, CheckpointWriteError, CheckpointLockError,
                NotACheckpointError, NonFiniteLossError, InputError, ProcessGroupError, FallbackError, LaunchError,
                PrepareError):
        assert issubclass(cls, UserError), cls

    def fails_with(exc):
        def main(argv):
            raise exc
        return main

    assert run_cli(fails_with(ProcessGroupError("port 29500 is in use"))) == 2
    assert capsys.readouterr().err == "error: port 29500 is in use\n"
    assert run_cli(fails_with(FileNotFoundError("no such file: x.yaml"))) == 2  # a path given on the command line
    assert capsys.readouterr().err == "error: no such file: x.yaml\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(fails_with(KeyError("model")))

    # The base lives below everything else: importing it loads no other module of lcr_fast.
    loaded = subprocess.run([sys.executable, "-c", "import sys, lcr_fast.errors; "
                             "print(sorted(m for m in sys.modules if m.startswith('lcr_fast.')))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "['lcr_fast.errors']"
