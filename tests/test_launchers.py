"""Every way a cluster job starts its processes forms one run: srun's and mpirun's variables without RANK, torchrun,
and two hosts (network namespaces joined by a veth pair) under ``deepspeed --no_ssh --node_rank``; a task that
never starts, and a host lost in the middle of an epoch, end the others with an error; the preemptible SLURM job
script stops on a real SIGUSR1, requeues itself and resumes.

Every run is checked step by step against one process accumulating two micro-batches: two ranks over a global
batch compute exactly that (see test_engine_scale.py).
"""
import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from lcr_fast.checkpoint import load_training_checkpoint
from lcr_fast.launch import slurm_port

from helpers import (LAUNCHER, REPO, TRAIN_PY, config_file, fake_slurm, free_port, metrics, recorded, run_command,
                     run_train, train_args, wait_for_logged, write_folder)

pytestmark = pytest.mark.slow

# Two ranks on a 2-core machine: a thread each (what torchrun sets, and SLURM's --cpus-per-task=1), not four
# threads spinning on two cores. The reference run uses one thread too.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TIMEOUT_S = 60  # engine.dist_timeout_s of these runs
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data, config, the losses of each step of one process accumulating two micro-batches over two epochs)."""
    root = tmp_path_factory.mktemp("launchers")
    write_folder(root / "data", classes=2, per_class=8, size=36)  # 16 images: 4 steps of 4 per epoch
    cfg = config_file(root, train={"batch_size": 4, "num_epochs": 3, "stop_at_epoch": 2, "knn_monitor": False},
                      engine={"dist_timeout_s": TIMEOUT_S}, logger={"tensorboard": False, "matplotlib": False},
                      eval=False)
    run = run_train(root, "reference", cfg, "engine.grad_accum_steps=2", env=ONE_THREAD)
    assert run.returncode == 0, run.stdout + run.stderr
    yield root / "data", cfg, _losses(root / "reference")
    shutil.rmtree(root, ignore_errors=True)


def _losses(run_dir):
    return {m["step"]: (m["ssl_loss"], m["rationale_loss"]) for m in metrics(run_dir) if "ssl_loss" in m}


def _assert_steps_equal(losses: dict, reference: dict, steps) -> None:
    assert sorted(losses) == list(steps)
    for step in steps:
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _slurm_job_with_free_port() -> int:
    """A job id whose derived master port (lcr_fast.launch.slurm_port) no one listens on now."""
    for job in random.sample(range(10**6), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job)))
            except OSError:
                continue
        return job
    raise AssertionError("no free port in SLURM's derived range")


def _task_env(style: str, rank: int, **extra) -> dict:
    """What srun or OpenMPI's mpirun hands task ``rank`` of two on this host; no RANK, no WORLD_SIZE."""
    if style == "srun":
        task = {"SLURM_PROCID": rank, "SLURM_NTASKS": 2, "SLURM_LOCALID": rank, "SLURM_NODEID": 0,
                "SLURM_NNODES": 1, "SLURM_JOB_NODELIST": "localhost"}
    else:
        task = {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": 2, "OMPI_COMM_WORLD_LOCAL_RANK": rank,
                "OMPI_COMM_WORLD_LOCAL_SIZE": 2}
    return {k: str(v) for k, v in {**ONE_THREAD, **task, **extra}.items()}


@pytest.mark.parametrize("style", ["srun", "mpirun"])
def test_two_tasks_without_rank_form_one_run(tmp_path, reference, style):
    data, cfg, expected = reference
    if style == "srun":
        job = _slurm_job_with_free_port()
        extra, launcher, master = {"SLURM_JOB_ID": job}, "slurm", f"localhost:{slurm_port(job)}"
    else:
        port = free_port()
        extra, launcher, master = {"MASTER_PORT": port}, "openmpi", f"127.0.0.1:{port}"
    tasks = [run_train(tmp_path, "run", cfg, data=data, env=_task_env(style, rank, **extra), wait=False)
             for rank in (0, 1)]
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for rank, output in enumerate(outputs):
        assert f"launch: {launcher}, rank {rank} of 2 on 1 node(s)" in output and f"local rank {rank}" in output
        assert f"process group at {master}" in output
    assert "report written to" in outputs[0] and "report written to" not in outputs[1], "one run, one report"
    _assert_steps_equal(_losses(tmp_path / "run"), expected, range(1, 2 * STEPS_PER_EPOCH + 1))
    run = _results(tmp_path / "run")["run"]
    assert (run["launcher"], run["world_size"], run["nodes"], run["master"]) == (launcher, 2, 1, master)
    assert [r["local_rank"] for r in run["ranks"]] == [0, 1] and run["hosts"] == [socket.gethostname()]


def test_torchrun_forms_one_run(tmp_path, reference):
    data, cfg, expected = reference
    torchrun = [LAUNCHER.parent / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), TRAIN_PY]
    proc = run_command(*train_args(tmp_path, "run", cfg, data=data), launcher=torchrun)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("launch: torchrun, rank") == 2 and "rank 1 of 2 on 1 node(s), node 0" in proc.stdout
    _assert_steps_equal(_losses(tmp_path / "run"), expected, range(1, 2 * STEPS_PER_EPOCH + 1))
    assert _results(tmp_path / "run")["run"]["launcher"] == "torchrun"


def _timed_lines(proc: subprocess.Popen) -> list[tuple[float, str]]:
    return [(time.monotonic(), line) for line in proc.stdout]


def test_a_task_that_never_starts_ends_the_others_within_the_timeout(tmp_path, reference):
    """Two announced tasks, one started: task 0 waits for its peer, task 1 (another job) for its master."""
    data, cfg, _ = reference
    timeout = 10
    alone = {rank: run_train(tmp_path, f"task{rank}", cfg, f"engine.dist_timeout_s={timeout}", data=data,
                             env=_task_env("srun", rank, SLURM_JOB_ID=_slurm_job_with_free_port()), wait=False)
             for rank in (0, 1)}
    with concurrent.futures.ThreadPoolExecutor() as pool:
        lines = {rank: pool.submit(_timed_lines, proc) for rank, proc in alone.items()}
        lines = {rank: future.result(timeout=300) for rank, future in lines.items()}
    for rank, proc in alone.items():
        assert proc.wait() == 2, "".join(text for _, text in lines[rank])[-3000:]
        joining = next(t for t, text in lines[rank] if text.startswith("launch: slurm"))
        error_at, error = next((t, text) for t, text in lines[rank] if text.startswith("error: "))
        assert error.startswith("error: cannot form the process group at localhost:")
        assert f"(rank {rank} of 2, launcher slurm)" in error and "timed out" in error.lower()
        assert f"Not all 2 processes joined within engine.dist_timeout_s={timeout} s: did srun start" in error
        # The window holds DeepSpeed's start as well: seconds, once the reference run has built its shared-memory op.
        assert timeout - 1 <= error_at - joining <= timeout + 10, error_at - joining
        assert not any("Traceback" in text for _, text in lines[rank])
    assert not (tmp_path / "task0" / "metrics.jsonl").exists(), "no step ran"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces, "hosts" 10.231.0.1 and .2, joined by a veth pair; [(namespace, interface, address)]."""
    tag = os.getpid()
    hosts = [(f"lcr{i}-{tag}", f"lcrv{i}-{tag}", f"10.231.0.{i + 1}") for i in range(2)]
    made = []
    try:
        for namespace, _, _ in hosts:
            added = _ip("netns", "add", namespace)
            if added.returncode:
                pytest.skip(f"network namespaces cannot be created here (`ip netns add`: {added.stderr.strip()})")
            made.append(namespace)
        (ns0, if0, _), (ns1, if1, _) = hosts
        commands = [("link", "add", if0, "netns", ns0, "type", "veth", "peer", "name", if1, "netns", ns1)]
        for namespace, interface, address in hosts:
            commands += [("-n", namespace, "addr", "add", f"{address}/24", "dev", interface),
                         ("-n", namespace, "link", "set", "lo", "up"),
                         ("-n", namespace, "link", "set", interface, "up")]
        for command in commands:
            done = _ip(*command)
            assert done.returncode == 0, f"ip {' '.join(command)}: {done.stderr}"
        yield hosts
    finally:
        for namespace in made:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            _ip("netns", "delete", namespace)


def _on_host(host: tuple, name: str) -> list:
    """A command line prefix that runs in ``host``'s namespace under its own host name ``name``."""
    return ["ip", "netns", "exec", host[0], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name]


def test_two_hosts_without_ssh_then_a_lost_host_and_a_resume_on_one(tmp_path, reference, two_hosts):
    data, cfg, expected = reference
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host0 slots=1\nhost1 slots=1\n")
    master = two_hosts[0][2]  # with --no_ssh deepspeed resolves no host names: the master is an address
    nodes = []
    for rank, host in enumerate(two_hosts):
        deepspeed = [*_on_host(host, f"host{rank}"), LAUNCHER, "--hostfile", hostfile, "--no_ssh", "--node_rank",
                     rank, "--master_addr", master, "--master_port", 29500, TRAIN_PY]
        # A third epoch to run into: the host is lost during the second, after the first one's checkpoint.
        nodes.append(run_command(*train_args(tmp_path, "run", cfg, "train.stop_at_epoch=3", data=data),
                                 launcher=deepspeed, wait=False,
                                 env={**ONE_THREAD, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": host[1]}))
    try:
        wait_for_logged(nodes[0], tmp_path / "run", lambda m: m["step"] > STEPS_PER_EPOCH)
        os.killpg(nodes[1].pid, signal.SIGKILL)  # host 1's launcher and rank: the host is gone
        lost_at = time.monotonic()
        output, _ = nodes[0].communicate(timeout=TIMEOUT_S + 60)
        assert nodes[0].returncode != 0, output[-3000:]
        assert time.monotonic() - lost_at < TIMEOUT_S, "within engine.dist_timeout_s"
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert f"launch: deepspeed, rank 0 of 2 on 2 node(s), node 0, local rank 0, process group at {master}:29500" \
        in output
    first_epoch = {step: losses for step, losses in _losses(tmp_path / "run").items() if step <= STEPS_PER_EPOCH}
    _assert_steps_equal(first_epoch, expected, range(1, STEPS_PER_EPOCH + 1))
    checkpoint = load_training_checkpoint(tmp_path / "run" / "ckpt" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, STEPS_PER_EPOCH), "the first epoch's checkpoint"
    written_by = checkpoint["runs"][-1]
    assert (written_by["launcher"], written_by["world_size"], written_by["nodes"]) == ("deepspeed", 2, 2)
    assert [r["host"] for r in written_by["ranks"]] == ["host0", "host1"]
    assert [r["node_rank"] for r in written_by["ranks"]] == [0, 1]

    # The run continues on one host, one process accumulating the two ranks' micro-batches.
    resumed = run_train(tmp_path, "run", cfg, "--resume", "engine.grad_accum_steps=2", data=data, env=ONE_THREAD,
                        launcher=[*_on_host(two_hosts[0], "host0"), sys.executable])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'ckpt' / 'last.pt'}: epoch 1, step {STEPS_PER_EPOCH}" in resumed.stdout
    after = {m["step"]: (m["ssl_loss"], m["rationale_loss"]) for m in metrics(tmp_path / "run")[-STEPS_PER_EPOCH:]}
    _assert_steps_equal(after, expected, range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))
    results = _results(tmp_path / "run")
    assert (results["run"]["launcher"], results["run"]["hosts"], results["run"]["first_step"]) == \
        ("single", ["host0"], STEPS_PER_EPOCH)
    assert [r["world_size"] for r in results["earlier_runs"]] == [2]


PREEMPTIBLE = REPO / "examples" / "slurm" / "preemptible.sbatch"


def test_the_preemptible_job_stops_on_sigusr1_requeues_and_resumes(tmp_path, reference):
    data, cfg, expected = reference
    record = tmp_path / "slurm.jsonl"
    bin_dir = fake_slurm(tmp_path / "bin")
    job_id = 31337
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_RECORD": record, "SLURM_JOB_ID": job_id,
           "SLURM_JOB_NAME": "lcr", "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": 1,
           "SLURM_NNODES": 1, "SLURM_CPUS_PER_TASK": 1, "VENV": LAUNCHER.parent.parent, "CONFIG": cfg, "DATA": data,
           "RUN": tmp_path / "run", "PYTHONUNBUFFERED": 1}
    env = {k: str(v) for k, v in env.items()}
    job = run_command("engine.grad_accum_steps=2", launcher=["bash", PREEMPTIBLE], env=env, wait=False)
    wait_for_logged(job, tmp_path / "run", lambda m: m["step"] >= 1)
    os.kill(job.pid, signal.SIGUSR1)  # --signal=B:USR1@120: to the batch shell, which passes it to the tasks
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    assert "stopped on a signal after optimizer step" in output
    assert f"requeueing job {job_id}" in output and ["scontrol", "requeue", str(job_id)] in recorded(record)
    checkpoint = load_training_checkpoint(tmp_path / "run" / "ckpt" / "last.pt")
    stopped_at = checkpoint["step"]
    assert 0 < checkpoint["extra"]["epoch_step"] < STEPS_PER_EPOCH, "a checkpoint in the middle of the epoch"
    assert [(r["launcher"], r["world_size"], r["first_step"]) for r in checkpoint["runs"]] == [("slurm", 1, 0)]

    # A checkpoint from before runs were recorded resumes as well.
    del checkpoint["runs"]
    torch.save(checkpoint, tmp_path / "run" / "ckpt" / "last.pt")
    requeued = run_command("engine.grad_accum_steps=2", launcher=["bash", PREEMPTIBLE], env=env)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert f"step {stopped_at} ({stopped_at % STEPS_PER_EPOCH} into the epoch)" in requeued.stdout
    assert sum(call[:2] == ["scontrol", "requeue"] for call in recorded(record)) == 1, "a finished job stays done"
    resumed = {m["step"]: (m["ssl_loss"], m["rationale_loss"]) for m in metrics(tmp_path / "run")
               if "ssl_loss" in m}  # the resumed steps' lines come last and replace none: each step is logged once
    _assert_steps_equal(resumed, expected, range(1, 2 * STEPS_PER_EPOCH + 1))
    results = _results(tmp_path / "run")
    assert (results["run"]["launcher"], results["run"]["first_step"]) == ("slurm", stopped_at)
    assert "earlier_runs" not in results
