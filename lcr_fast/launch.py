"""Which process of which run this is, read from the variables the launcher set.

Launchers name the same facts differently; :func:`read_launch` reads them in this order:

1. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``: the deepspeed launcher (pdsh, ``--no_ssh``, and its mpich and
   impi launchers, which export them), torchrun, or a job script that sets them;
2. OpenMPI's ``mpirun`` (DeepSpeed's ``--launcher openmpi``): ``OMPI_COMM_WORLD_RANK`` / ``SIZE`` / ``LOCAL_RANK``;
3. MVAPICH's ``mpirun`` (DeepSpeed's ``--launcher mvapich``): ``MV2_COMM_WORLD_RANK`` / ``SIZE`` / ``LOCAL_RANK``;
4. MPICH's and Intel MPI's ``mpirun`` (Hydra): ``PMI_RANK`` / ``PMI_SIZE`` / ``MPI_LOCALRANKID``;
5. ``srun`` (DeepSpeed's ``--launcher slurm``): ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` /
   ``SLURM_NODEID``, the master the first host of the step's node list, the port derived from the job id;
6. else a single process.

The MPI launchers come before SLURM's variables: inside an allocation mpirun starts its ranks from one
daemon per node that srun started, so every rank inherits that daemon's SLURM_PROCID (the node's index),
not a rank of its own. Without MPI_LOCALRANKID the PMI variables are those of srun's PMI plugin, and
SLURM's variables (which carry the local rank) describe the task.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .errors import InputError

# The master port of an srun task without MASTER_PORT, 12000 + job id mod 20000: every task of the job computes
# the same one, two jobs sharing a node rarely do, and it stays below Linux's ephemeral ports (32768 and up).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 12000, 20000
# What torch and DeepSpeed's own MPI discovery use when no port is given.
DEFAULT_PORT = 29500
LOOPBACK = "127.0.0.1"

# Every variable read here: a test or a tool that starts a run of its own must not pass these on.
LAUNCH_PREFIXES = ("SLURM_", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_", "PMI_", "MPI_LOCAL")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


class LaunchError(InputError):
    """The launcher's variables do not describe a process of a run (a rank outside the world, a missing master)."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the run, as its launcher announced it."""

    launcher: str  # deepspeed | torchrun | env | openmpi | mvapich | mpich | slurm | single
    rank: int
    world_size: int
    local_rank: int
    node_rank: int | None  # None: the launcher does not say
    nodes: int | None
    master_addr: str
    master_port: int | None  # None: any free local port (a group of one)
    hosts: tuple[str, ...] = ()  # the node list SLURM announced, expanded

    def describe(self) -> str:
        """One line for the log: what was recognised, and where the group forms."""
        node = "" if self.node_rank is None else f", node {self.node_rank}"
        nodes = "" if self.nodes is None else f" on {self.nodes} node(s)"
        master = f"{self.master_addr}:{self.master_port}" if self.master_port is not None else "a free local port"
        return (f"launch: {self.launcher}, rank {self.rank} of {self.world_size}{nodes}{node}, local rank "
                f"{self.local_rank}, process group at {master}")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in full, as ``scontrol show hostnames`` prints it, without needing scontrol:
    ``gpu[01-03,07],cpu3`` -> gpu01, gpu02, gpu03, gpu07, cpu3. Ranges keep the width of their lower bound;
    several bracket groups in one name combine (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2)."""
    hosts = [host for item in _split_top_level(nodelist) for host in _expand_item(item, nodelist)]
    if not hosts:
        raise LaunchError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas between host names, not those inside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise LaunchError(f"unbalanced brackets in SLURM node list {nodelist!r}")
        if char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"unbalanced brackets in SLURM node list {nodelist!r}")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, nodelist: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        if "]" in item:
            raise LaunchError(f"unbalanced brackets in SLURM node list {nodelist!r}")
        return [item]
    close_at = item.index("]", open_at)
    prefix, ranges, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    tails = _expand_item(rest, nodelist)
    return [prefix + number + tail for number in _expand_ranges(ranges, nodelist) for tail in tails]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise LaunchError(f"bad range {part!r} in SLURM node list {nodelist!r}")
        low, high = match[1], match[2] if match[2] is not None else match[1]
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers


def slurm_port(job_id: int) -> int:
    """The master port every task of SLURM job ``job_id`` derives when MASTER_PORT is not set."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` that is set, as an integer; None when none is."""
    for name in names:
        if name in environ:
            try:
                return int(environ[name])
            except ValueError:
                raise LaunchError(f"{name}={environ[name]!r} is not an integer") from None
    return None


def read_launch(environ: Mapping[str, str]) -> Launch:
    """This process's rank, world, local rank, node and master, from ``environ`` (see the module's docstring)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launch = _explicit(environ)
    elif "OMPI_COMM_WORLD_RANK" in environ:
        launch = _mpi(environ, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                      "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "MV2_COMM_WORLD_RANK" in environ:
        launch = _mpi(environ, "mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                      "MV2_COMM_WORLD_LOCAL_SIZE")
    elif "PMI_RANK" in environ and "MPI_LOCALRANKID" in environ:
        launch = _mpi(environ, "mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    elif "SLURM_PROCID" in environ:
        launch = _slurm(environ)
    elif "PMI_RANK" in environ:
        raise LaunchError("PMI_RANK is set but neither MPI_LOCALRANKID (MPICH, Intel MPI) nor SLURM_LOCALID (srun): "
                          "the local rank is unknown; set LOCAL_RANK, or RANK, WORLD_SIZE and LOCAL_RANK")
    else:
        launch = Launch("single", 0, 1, 0, 0, 1, environ.get("MASTER_ADDR", LOOPBACK), _int(environ, "MASTER_PORT"))
    _check(launch)
    return launch


def _explicit(environ: Mapping[str, str]) -> Launch:
    if "CROSS_RANK" in environ:  # DeepSpeed's launch.py: the node's rank and the number of nodes
        launcher, node_rank, nodes = "deepspeed", _int(environ, "CROSS_RANK"), _int(environ, "CROSS_SIZE")
    elif "TORCHELASTIC_RUN_ID" in environ:
        launcher, node_rank, nodes = "torchrun", _int(environ, "GROUP_RANK"), _int(environ, "GROUP_WORLD_SIZE")
    else:
        launcher, node_rank, nodes = "env", _int(environ, "SLURM_NODEID"), None
    world_size = _int(environ, "WORLD_SIZE")
    # A script that sets RANK and WORLD_SIZE by hand from srun's or mpirun's variables may leave LOCAL_RANK out.
    local_rank = _int(environ, "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
    return Launch(launcher, _int(environ, "RANK"), world_size, local_rank or 0, node_rank, nodes,
                  environ.get("MASTER_ADDR", LOOPBACK), _int(environ, "MASTER_PORT") or DEFAULT_PORT)


def _mpi(environ: Mapping[str, str], launcher: str, rank: str, size: str, local_rank: str, local_size: str) -> Launch:
    world_size, local_world = _int(environ, size), _int(environ, local_size)
    if world_size is None:
        raise LaunchError(f"{rank} is set without {size}")
    nodes = -(-world_size // local_world) if local_world else None
    hosts = tuple(expand_nodelist(environ["SLURM_JOB_NODELIST"])) if "SLURM_JOB_NODELIST" in environ else ()
    master, port = _master(environ, world_size, hosts)
    if master is None:
        if local_world is not None and local_world < world_size:
            raise LaunchError(f"{launcher}'s mpirun runs {world_size} ranks on several hosts ({local_size}="
                              f"{local_world}) but MASTER_ADDR is not set: export the first host's address to every "
                              f"rank ({'-x' if launcher == 'openmpi' else '-genv'} MASTER_ADDR=<host>)")
        master = LOOPBACK  # all ranks on this host
    if port is None and world_size > 1:
        port = DEFAULT_PORT
    return Launch(launcher, _int(environ, rank), world_size, _int(environ, local_rank) or 0, None, nodes, master,
                  port, hosts)


def _master(environ: Mapping[str, str], world_size: int, hosts: tuple[str, ...]) -> tuple[str | None, int | None]:
    """MASTER_ADDR and MASTER_PORT when set; else, for several processes, the first announced host (mpirun in an
    allocation maps rank 0 to its first node, srun task 0 runs there) and no port yet. A process alone needs no
    address the others agree on: the loopback and a free port, so that single-task steps side by side on a node
    cannot collide."""
    port = _int(environ, "MASTER_PORT")
    if "MASTER_ADDR" in environ:
        return environ["MASTER_ADDR"], port
    if world_size == 1:
        return LOOPBACK, port
    return (hosts[0] if hosts else None), port


def _slurm(environ: Mapping[str, str]) -> Launch:
    # srun's own variables first: a step may run fewer tasks, on fewer nodes, than the job it belongs to.
    world_size = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or 1
    nodelist = next((environ[n] for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if n in environ), None)
    hosts = tuple(expand_nodelist(nodelist)) if nodelist is not None else ()
    nodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or len(hosts) or None
    master, port = _master(environ, world_size, hosts)
    if master is None:
        raise LaunchError(f"srun runs {world_size} tasks, but neither SLURM_JOB_NODELIST nor MASTER_ADDR names "
                          "the host of task 0")
    if port is None and world_size > 1:
        job_id = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        port = slurm_port(job_id) if job_id is not None else DEFAULT_PORT
    return Launch("slurm", _int(environ, "SLURM_PROCID"), world_size, _int(environ, "SLURM_LOCALID") or 0,
                  _int(environ, "SLURM_NODEID"), nodes, master, port, hosts)


def _check(launch: Launch) -> None:
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"the {launch.launcher} launcher's variables give rank {launch.rank} of {launch.world_size}: "
                          "a rank must lie in [0, world size)")
    if launch.local_rank < 0:
        raise LaunchError(f"the {launch.launcher} launcher's variables give local rank {launch.local_rank}")
