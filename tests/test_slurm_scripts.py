"""The SLURM job scripts of examples/slurm parse, and every option they pass exists: each runs once with srun,
scontrol, deepspeed and python replaced by recorders (helpers.fake_slurm), and what they recorded goes through
deepspeed's and train.py's own argument parsers and the config's checks. test_launchers.py runs the
preemptible script for real."""
import contextlib
import io
import re
import subprocess

import pytest

from lcr_fast import train

from helpers import REPO, fake_slurm, recorded

SCRIPTS = sorted((REPO / "examples" / "slurm").glob("*.sbatch"))

# The sbatch(1) and srun(1) options the scripts use, as Slurm's manual pages spell them (nothing here can ask
# Slurm): a script that passes another fails until it is checked there and added.
SBATCH_OPTIONS = {"job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "output", "requeue",
                  "signal", "open-mode"}
SRUN_OPTIONS = {"kill-on-bad-exit"}


def test_the_scripts_are_there_and_parse():
    assert {p.name for p in SCRIPTS} == {"one_node_deepspeed.sbatch", "one_node_srun.sbatch", "nodes_srun.sbatch",
                                         "nodes_deepspeed_no_ssh.sbatch", "preemptible.sbatch"}
    for script in SCRIPTS:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
        assert script.read_text().startswith("#!/bin/bash\n"), "sbatch runs a script by its first line"


def _options(words):
    return {w[2:].split("=")[0] for w in words if w.startswith("--")}


def _train_args(argv: list[str]) -> list[str]:
    """What follows lcr_fast/train.py on a command line."""
    return argv[argv.index("lcr_fast/train.py") + 1:]


def _help_options(parse_args) -> set[str]:
    """The option names a parser's --help lists: argparse also takes abbreviations, which the scripts must not use."""
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        parse_args(["--help"])
    return {name[2:] for name in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", out.getvalue())}


def _check_train_command(args: list[str]) -> None:
    assert _options(args) <= _help_options(train.parse_args), _options(args) - _help_options(train.parse_args)
    parsed = train.parse_args(args)  # an unknown option is a SystemExit here
    assert parsed.resume == "auto" and parsed.hide_progress
    cfg = train.resolve_config(parsed)  # an unknown override or config file is a ConfigError
    assert cfg.train.batch_size == 256


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_option_a_script_passes_exists(script, tmp_path, monkeypatch):
    from deepspeed.launcher.runner import parse_args as deepspeed_args

    venv = tmp_path / "venv"
    shims = fake_slurm(venv / "bin", "python", "deepspeed")
    (venv / "bin" / "activate").write_text(f'PATH="{shims}:$PATH"\n')
    record = tmp_path / "record.jsonl"
    env = {"PATH": "/usr/bin:/bin", "SLURM_RECORD": str(record), "SLURM_JOB_ID": "4321", "SLURM_JOB_NAME": "lcr",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_CPUS_PER_TASK": "8", "VENV": str(venv), "RUN": str(tmp_path / "run")}
    job = subprocess.run(["bash", str(script), "train.batch_size=256"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert job.returncode == 0, job.stdout + job.stderr

    directives = re.findall(r"^#SBATCH\s+(\S+)", script.read_text(), flags=re.M)
    assert directives and _options(directives) <= SBATCH_OPTIONS, _options(directives) - SBATCH_OPTIONS
    calls = recorded(record)
    trainers = 0
    monkeypatch.chdir(REPO)  # the scripts run from the checkout, where their config paths point
    for name, *argv in calls:
        if name == "srun":
            assert _options(argv[:next(i for i, a in enumerate(argv) if not a.startswith("-"))]) <= SRUN_OPTIONS
        elif name == "deepspeed":
            launch = deepspeed_args(argv)
            assert launch.user_script == "lcr_fast/train.py"
            own = argv[:argv.index("lcr_fast/train.py")]
            assert _options(own) <= _help_options(deepspeed_args), _options(own) - _help_options(deepspeed_args)
            if launch.no_ssh:
                assert launch.node_rank == 0 and launch.master_addr == "gpu01"
                assert (tmp_path / "run" / "hostfile-4321").read_text() == "gpu01 slots=8\ngpu02 slots=8\n"
            assert launch.master_port == 12000 + 4321 % 20000
            _check_train_command(launch.user_args)
            trainers += 1
        elif name == "python":
            assert argv[:2] == ["-u", "lcr_fast/train.py"]
            _check_train_command(_train_args(argv))
            trainers += 1
        else:
            assert name == "scontrol" and argv[:2] == ["show", "hostnames"], argv
    assert trainers == 1, calls
