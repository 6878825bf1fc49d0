"""Reading the launch environment (lcr_fast.launch) from the variables each launcher sets, and the run's record
(lcr_fast.run_info); the launchers themselves start real processes in test_launchers.py."""
import importlib.metadata
import subprocess
import sys

import pytest
import torch
import torchvision

import lcr_fast
from lcr_fast import run_info
from lcr_fast.checkpoint import load_training_checkpoint, save_training_checkpoint
from lcr_fast.errors import USER_ERRORS
from lcr_fast.launch import Launch, LaunchError, expand_nodelist, read_launch, slurm_port
from lcr_fast.results import training_markdown

from helpers import REPO


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("node[1-2]", ["node1", "node2"]),
    ("n[008-011]", ["n008", "n009", "n010", "n011"]),  # the width is the lower bound's
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("login1", ["login1"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # several bracket groups combine, the last fastest
    ("a[1,3]-ib,b7", ["a1-ib", "a3-ib", "b7"]),
    ("c[5]", ["c5"]),
])
def test_slurm_node_lists_expand_as_scontrol_prints_them(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("gpu[01-04", "unbalanced brackets"),
    ("gpu01-04]", "unbalanced brackets"),
    ("gpu[[1]]", "unbalanced brackets"),
    ("gpu[3-1]", "bad range '3-1'"),
    ("gpu[a]", "bad range 'a'"),
    ("gpu[]", "bad range ''"),
    (" , ", "empty SLURM node list"),
])
def test_malformed_node_lists_are_named(nodelist, message):
    with pytest.raises(LaunchError, match=message):
        expand_nodelist(nodelist)


def test_no_launcher_is_one_process_on_a_free_local_port():
    assert read_launch({}) == Launch("single", 0, 1, 0, 0, 1, "127.0.0.1", None)
    assert read_launch({"MASTER_PORT": "23456"}).master_port == 23456


def test_deepspeed_and_torchrun_variables_come_first():
    deepspeed = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600",
                 "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}
    assert read_launch(deepspeed) == Launch("deepspeed", 3, 4, 1, 1, 2, "10.0.0.1", 29600)
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400",
                "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "2"}
    assert read_launch(torchrun) == Launch("torchrun", 1, 2, 1, 0, 1, "127.0.0.1", 29400)
    # deepspeed --no_ssh --node_rank $SLURM_NODEID, started by srun once per node: SLURM_PROCID is the node's
    # index there, not the rank.
    per_node = {**deepspeed, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77"}
    assert read_launch(per_node) == read_launch(deepspeed)


def test_rank_and_world_size_by_hand_take_the_local_rank_from_the_launcher():
    launch = read_launch({"RANK": "5", "WORLD_SIZE": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2"})
    assert (launch.launcher, launch.rank, launch.local_rank, launch.node_rank) == ("env", 5, 1, 2)
    assert (launch.master_addr, launch.master_port) == ("127.0.0.1", 29500)


SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_NODEID": "0", "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}


def test_srun_tasks_find_the_first_host_and_one_port_derived_from_the_job():
    assert read_launch(SRUN) == Launch("slurm", 3, 8, 3, 0, 2, "gpu07", 15456, ("gpu07", "gpu08"))
    assert slurm_port(123456) == 12000 + 123456 % 20000
    assert {slurm_port(job) for job in range(100, 20100)} == set(range(12000, 32000)), "below the ephemeral ports"
    # A step on part of the job's nodes: the step's list, count and tasks.
    step = {**SRUN, "SLURM_STEP_NODELIST": "gpu08", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    assert read_launch(step) == Launch("slurm", 1, 4, 1, 0, 1, "gpu08", 15456, ("gpu08",))
    given = read_launch({**SRUN, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "40000"})
    assert (given.master_addr, given.master_port) == ("10.1.2.3", 40000)


def test_one_srun_task_forms_its_group_locally():
    # Sweeps run `srun -n1 ... &` side by side on a node: a port derived from the job would collide.
    alone = read_launch({**SRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    assert (alone.world_size, alone.master_addr, alone.master_port) == (1, "127.0.0.1", None)


def test_a_batch_script_run_without_srun_waits_for_the_tasks_it_announced():
    # `python train.py` in an `sbatch --ntasks=2` script: task 0 of 2, whose peer never starts (the timeout's case).
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_JOB_NODELIST": "cpu3", "SLURM_JOB_ID": "9"}
    assert read_launch(batch) == Launch("slurm", 0, 2, 0, 0, 1, "cpu3", 12009, ("cpu3",))


OMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def test_openmpi_ranks():
    assert read_launch(OMPI) == Launch("openmpi", 1, 2, 1, None, 1, "127.0.0.1", 29500)
    # mpirun inside an allocation starts ranks from one daemon per node, which srun started: its SLURM_PROCID is
    # the node's index, shared by the node's ranks.
    inside = {**OMPI, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[3-4]",
              "MASTER_PORT": "23000"}
    assert read_launch(inside) == Launch("openmpi", 1, 2, 1, None, 1, "n3", 23000, ("n3", "n4"))
    two_hosts = {**OMPI, "OMPI_COMM_WORLD_SIZE": "4"}
    with pytest.raises(LaunchError, match=r"runs 4 ranks on several hosts .*\(-x MASTER_ADDR=<host>\)"):
        read_launch(two_hosts)
    assert read_launch({**two_hosts, "MASTER_ADDR": "n3"}).nodes == 2


def test_mvapich_ranks():
    mvapich = {"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "1",
               "MV2_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h1", "MASTER_PORT": "23500"}
    assert read_launch(mvapich) == Launch("mvapich", 3, 4, 1, None, 2, "h1", 23500)
    # Its mpirun is Hydra's, which also sets the PMI variables: MVAPICH's own are read.
    assert read_launch({**mvapich, "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"}) == read_launch(mvapich)
    with pytest.raises(LaunchError, match=r"mvapich's mpirun runs 4 ranks on several hosts .*-genv MASTER_ADDR"):
        read_launch({k: v for k, v in mvapich.items() if k != "MASTER_ADDR"})


def test_mpich_and_intel_mpi_ranks():
    hydra = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "h1"}
    assert read_launch(hydra) == Launch("mpich", 2, 4, 0, None, 2, "h1", 29500)
    # srun --mpi=pmi2 sets PMI_RANK and PMI_SIZE, but its local rank is SLURM's.
    pmi2 = {**SRUN, "PMI_RANK": "3", "PMI_SIZE": "8"}
    assert read_launch(pmi2) == read_launch(SRUN)
    with pytest.raises(LaunchError, match="PMI_RANK is set but neither MPI_LOCALRANKID"):
        read_launch({"PMI_RANK": "0", "PMI_SIZE": "2"})


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 of 2"),
    ({"SLURM_PROCID": "one", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1"}, "SLURM_PROCID='one' is not an integer"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "neither SLURM_JOB_NODELIST nor MASTER_ADDR"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_RANK is set without OMPI_COMM_WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "local rank -1"),
])
def test_variables_that_describe_no_process_are_input_errors(environ, message):
    with pytest.raises(LaunchError, match=message) as caught:
        read_launch(environ)
    assert isinstance(caught.value, USER_ERRORS), "a one-line error: and exit status 2"


def test_the_log_line_says_launcher_world_nodes_and_local_rank():
    assert read_launch(SRUN).describe() == ("launch: slurm, rank 3 of 8 on 2 node(s), node 0, local rank 3, process "
                                            "group at gpu07:15456")
    assert read_launch(OMPI).describe() == ("launch: openmpi, rank 1 of 2 on 1 node(s), local rank 1, process group "
                                            "at 127.0.0.1:29500")


def test_versions_are_those_installed():
    found = run_info.versions()
    assert found["torch"] == torch.__version__ and found["cuda"] == torch.version.cuda
    assert found["torchvision"] == torchvision.__version__ and found["lcr_fast"] == lcr_fast.__version__
    dali = [d.metadata["Name"] for d in importlib.metadata.distributions()
            if d.metadata["Name"].lower().startswith("nvidia-dali")]
    assert found["dali"] == (importlib.metadata.version(dali[0]) if dali else None)
    assert found["deepspeed"] == importlib.metadata.version("deepspeed")
    assert found["cudnn"] == (str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None)
    assert all(type(version) is str for version in found.values() if version is not None), "not torch's TorchVersion"


def test_git_commit_only_from_a_checkout(tmp_path):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run_info.git_commit(str(REPO))["commit"] == head
    assert run_info.git_commit(str(tmp_path)) is None, "an installed package has no .git beside it"


def test_cpu_model_is_the_model_name_of_proc_cpuinfo():
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    assert run_info.cpu_model() == names[0]


def _record(launcher, hosts, first_step, nodes=None):
    launch = Launch(launcher, 0, len(hosts), 0, 0, nodes, hosts[0], 29500)
    ranks = [{"host": h, "node_rank": None, "local_rank": 0, "device": "NVIDIA H200"} for h in hosts]
    return run_info.collect(launch, torch.device("cpu"), ranks, first_step)


def test_the_record_counts_hosts_when_the_launcher_does_not_and_the_report_shows_each_run():
    first = _record("deepspeed", ["a", "b"], 0, nodes=2)
    second = _record("openmpi", ["c", "c", "d"], 4)
    assert (second["nodes"], second["hosts"], second["world_size"]) == (2, ["c", "d"], 3)
    assert first["command"] == [sys.executable, *sys.argv]
    report = training_markdown({"name": "run", "run": second, "earlier_runs": [first]})
    assert "- launcher: openmpi, 3 rank(s) on 2 node(s) (hosts c, d), process group at c:29500" in report
    assert "- devices: NVIDIA H200 x 3" in report
    assert "- steps 0 to 4: deepspeed, 2 rank(s) on 2 node(s) (hosts a, b)" in report
    assert "- steps 4 on (this run): openmpi" in report
    assert f"torch {torch.__version__}" in report and f"lcr-fast {lcr_fast.__version__}" in report


def test_checkpoints_carry_the_records_and_load_without_running_code(tmp_path):
    model = torch.nn.Linear(3, 2)
    runs = [_record("slurm", ["a", "b"], 0, nodes=2), _record("single", ["a"], 6)]
    save_training_checkpoint(tmp_path / "last.pt", model, None, 1, 6, {"name": "x"}, runs=runs)
    assert load_training_checkpoint(tmp_path / "last.pt")["runs"] == runs  # weights_only: plain values only
