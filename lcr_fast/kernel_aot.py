"""Ahead-of-time compile checks: the kernels' real launches, compiled to cubin for GPUs that are not here.

It lives beside the kernels package, not in it: recording runs the models, which the kernels must not
know of.

Triton's interpreter runs code that its compiler refuses (a ``break``, a device helper without
``@triton.jit``, ...), and it cannot tell whether a kernel fits in registers, so the interpreter
tests prove nothing about the GPU build. Here:

* ``recording`` takes the launches from the ops' own launchers while a workload runs, so the list
  of signatures cannot drift from them. It intercepts each launch instead of running the kernel and
  specialises its arguments as Triton's JIT does (``tl.constexpr`` values, integers equal to 1 folded
  in, multiples of 16 and 16-byte aligned pointers marked).
* ``record_workloads`` runs every registered method's training steps and ``model.extract`` at the paper's
  shapes, and with a 512-channel trunk (ResNet-18 and -34; the other ResNets have the paper's 2048), on
  fake tensors (shapes, dtypes and strides without data): the models' own heads, rationale detector and
  kernel calls, with the launch plans made for an A100 or H100 (``planning_for_gpu``).
* ``compile_launches`` compiles them in a child process with TRITON_INTERPRET unset (under the
  interpreter ``@triton.jit`` builds objects that cannot be compiled), and with ``resources=True``
  reads registers and spills from ``ptxas -v`` and shared memory from Triton's metadata.

None of it needs a GPU or the interpreter: the Triton wheel's ptxas builds cubins on any machine.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Iterable, Iterator

import torch

from lcr_fast import kernels, methods
from lcr_fast.config import DEFAULTS, load_config
from lcr_fast.engine import autocast
from lcr_fast.kernels import dispatch
from lcr_fast.models import build_model
from lcr_fast.models.backbone import ResNetTrunk, resolve_arch

# The SM counts a launch plan fills per compile target: A100 (sm_80), H100 and H200 (sm_90).
GPU_SMS = {80: 108, 90: 132}


class KernelCompileError(RuntimeError):
    """At least one recorded launch does not compile; the message names each one with its error."""


@dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton's JIT specialises it: what decides which binary is compiled."""

    module: str
    name: str
    signature: tuple[tuple[str, str], ...]  # every parameter -> "*fp32", "i32", "fp32", "constexpr", ...
    constexprs: tuple[tuple[str, Any], ...]  # tl.constexpr parameters and integers equal to 1
    attrs: tuple[tuple[str, str], ...]  # non-constexpr parameter -> Triton's specialisation key ("D": 16 | value)
    options: tuple[tuple[str, Any], ...]  # num_warps, num_stages, ... as given at launch

    def describe(self) -> str:
        marks = dict(self.attrs)
        args = [f"{p}={v!r}" for p, v in self.constexprs]
        args += [f"{p}:{t}{'/16' if 'D' in marks.get(p, '') else ''}" for p, t in self.signature if t != "constexpr"]
        opts = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.name}({', '.join(args)}){opts}"


@dataclass(frozen=True)
class Compiled:
    """A launch compiled for one architecture; the resource fields are None unless asked for."""

    launch: Launch
    arch: int
    num_warps: int
    shared: int  # bytes of shared memory per program (Triton's allocation, dynamic)
    registers: int | None = None  # per thread
    spill_stores: int | None = None  # bytes per thread
    spill_loads: int | None = None


def kernel_modules() -> list[ModuleType]:
    """Every module of the kernels package (the ops' files), imported."""
    return [importlib.import_module(f"{kernels.__name__}.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]


def jit_functions(modules: Iterable[ModuleType]) -> list[Any]:
    """The ``@triton.jit`` objects the modules define: kernels and device helpers."""
    import triton

    return [obj for module in modules for obj in vars(module).values()
            if isinstance(obj, triton.runtime.KernelInterface) and getattr(obj, "fn", None) is not None
            and obj.fn.__module__ == module.__name__]


def _is_constexpr(annotation: Any) -> bool:
    import triton.language as tl

    return annotation is tl.constexpr or (isinstance(annotation, str) and annotation.split(".")[-1] == "constexpr")


class _Address:
    """What Triton's specialisation reads of a tensor: its dtype and address. The address is the offset into
    the tensor's allocation, as the allocation itself is aligned on a GPU (to 256 bytes or more) and fake
    tensors have none."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


def _launch_of(kernel: Any, args: tuple, kwargs: dict, backend: Any) -> Launch:
    # Triton's JIT derives a launch's binary key with this function; using it keeps the recorded
    # signature identical to what the JIT would compile (it is not re-exported under a public name).
    from triton.runtime.jit import native_specialize_impl

    fn_signature = inspect.signature(kernel.fn)
    params = fn_signature.parameters
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}  # num_warps, num_stages, ...
    bound = fn_signature.bind(*args, **kwargs)
    bound.apply_defaults()
    settings = getattr(kernel, "kwargs", None) or vars(kernel)  # the interpreter keeps the jit options apart
    no_spec = set(settings.get("do_not_specialize") or ())
    no_align = set(settings.get("do_not_specialize_on_alignment") or ())
    signature, constexprs, attrs = [], [], []
    for i, (name, value) in enumerate(bound.arguments.items()):
        if _is_constexpr(params[name].annotation):
            ty, key = "constexpr", None
        else:
            arg = _Address(value) if isinstance(value, torch.Tensor) else value
            ty, key = native_specialize_impl(type(backend), arg, False, not ({i, name} & no_spec),
                                             not ({i, name} & no_align))
        signature.append((name, ty))
        if ty == "constexpr":
            constexprs.append((name, value))
        elif isinstance(key, str):
            attrs.append((name, key))
    return Launch(kernel.fn.__module__, kernel.fn.__name__, tuple(signature), tuple(constexprs), tuple(attrs),
                  tuple(sorted(options.items())))


@contextlib.contextmanager
def recording(kernels: Iterable[Any]) -> Iterator[list[Launch]]:
    """Within the block, launches of ``kernels`` are appended to the yielded list instead of running.

    Outputs the kernels would have written stay uninitialised, which is fine for recording: launch
    plans depend on shapes, dtypes and strides only. Works on interpreted and compiled ``@triton.jit``
    objects alike, by shadowing their ``run`` (which ``kernel[grid](...)`` calls) on the instance.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    # Specialisation is the same for every CUDA target (it is the base backend's), so one backend serves.
    backend = make_backend(GPUTarget("cuda", 90, 32))
    launches: list[Launch] = []
    kernels = list(kernels)

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(_launch_of(kernel, args, kwargs, backend))
        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run


@dataclass(frozen=True)
class Workload:
    """A training step or a ``model.extract`` call of a model as the paper trains it."""

    model: str  # a method's name (lcr_fast.methods)
    kind: str  # step | extract
    batch: int  # per GPU
    precision: str  # fp32 | bf16 (autocast, as engine.precision)
    channels_last: bool  # engine.channels_last
    fixes: bool  # every config.fixes switch on (the corrected behaviours) instead of the reference's quirks
    backbone: str | None = None  # a torchvision ResNet in place of the paper's, same stride; None: the paper's


# Every registered method's model as the paper's runs train it (BYOL: ResNet-50 without the stem max-pool,
# layer4 14x14 at 224 px; MoCo v2 and SimSiam: ResNet-50, 7x7), everything else at the config defaults:
# heads, detector of 32 channels, MoCo's queue K = 65536 of dim 256, SimSiam's 2048-d projections.
PAPER_MODELS = {name: dict(methods.get(name).paper_model) for name in methods.names()}
IMAGE_SIZE = 224
# Training: batch 128 on one GPU, or split over 8. Extract: the linear probe's 256, the training batch,
# and the last, partial batch of an epoch (any size: an odd one, a single image).
BATCHES = {"step": (128, 16), "extract": (256, 128, 16, 37, 1)}
PAPER_WORKLOADS = tuple(
    Workload(model, kind, batch, precision, channels_last, fixes)
    for model, (kind, batch), precision, channels_last, fixes in itertools.product(
        PAPER_MODELS, [(kind, b) for kind, sizes in BATCHES.items() for b in sizes], ("fp32", "bf16"),
        (True, False), (False, True)))
# torchvision's ResNets put 2048 channels in layer4 (ResNet-50, -101, -152, Wide ResNet-50-2, ResNeXt-50: the paper's
# width) or 512 (ResNet-18, -34); the kernels see the trunk only through that map, so one narrow trunk covers the
# family. Recorded, the width changes the feature normalisation's block alone (BLOCK=512 in fp32 and bf16): one
# batch size per kind suffices.
NARROW_BACKBONE = "resnet18"
WIDTH_WORKLOADS = tuple(
    Workload(model, kind, sizes[0], precision, channels_last, fixes, NARROW_BACKBONE)
    for model, (kind, sizes), precision, channels_last, fixes in itertools.product(
        PAPER_MODELS, BATCHES.items(), ("fp32", "bf16"), (True, False), (False, True)))
WORKLOADS = PAPER_WORKLOADS + WIDTH_WORKLOADS


class _Layer4StandIn(torch.nn.Module):
    """[B, 3, H, W] -> [B, C, H / stride, W / stride]: a ResNet trunk's layer4 output (shape, dtype under
    autocast, memory format) from two ops instead of the trunk's hundreds, forward and backward."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(stride)
        self.conv = torch.nn.Conv2d(3, channels, kernel_size=1)
        self.output_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


def _model_section(name: str, backbone: str | None) -> dict:
    """The paper's ``model`` section of method ``name``, with ``backbone`` in place of its trunk at the same stride."""
    paper = PAPER_MODELS[name]
    if backbone is None:
        return paper
    _, maxpool = resolve_arch(paper["backbone"], paper.get("maxpool"))
    return {**paper, "backbone": backbone, "maxpool": maxpool}


def _paper_model(name: str, fixes: bool, backbone: str | None = None) -> torch.nn.Module:
    """The model on the meta device (no storage, so it costs nothing), its ResNet trunks replaced by
    stand-ins of the same output channels and stride; the heads, detector and kernel calls are its own."""
    with torch.device("meta"):
        model = build_model(load_config(None, {"model": _model_section(name, backbone),
                                               "fixes": {k: fixes for k in DEFAULTS["fixes"]}}))
        for child_name, child in list(model.named_children()):
            if isinstance(child, ResNetTrunk):
                side = child(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)).shape[-1]
                stand_in = _Layer4StandIn(child.output_dim, IMAGE_SIZE // side)
                setattr(model, child_name, stand_in.requires_grad_(any(p.requires_grad for p in child.parameters())))
    return model


def _materialise(model: torch.nn.Module, layout: torch.memory_format) -> None:
    """Gives every parameter and buffer a new CPU tensor (fake, under FakeTensorMode) of its shape and dtype,
    4-D ones in ``layout``: what ``model.to(memory_format=layout)`` leaves (engine.channels_last)."""
    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device="cpu",
                           memory_format=layout if t.dim() == 4 else torch.contiguous_format)

    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(like(p), p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, like(b))


def _run(model: torch.nn.Module, work: Workload) -> None:
    """What a training step does to the model (EMA, forward under autocast, backward of the objective), or
    what evaluation does per batch."""
    layout = torch.channels_last if work.channels_last else torch.contiguous_format
    _materialise(model, layout)
    cpu = torch.device("cpu")
    images = [torch.zeros(work.batch, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=layout)
              for _ in range(2 if work.kind == "step" else 1)]
    if work.kind == "step":
        model.train()
        model.momentum_update()
        with autocast(work.precision, cpu):
            out = model(*images)
        out["loss"].backward()
    else:
        model.eval()
        with autocast(work.precision, cpu):
            model.extract(*images)


def record_workloads(workloads: Iterable[Workload] = WORKLOADS,
                     archs: Iterable[int] = tuple(GPU_SMS)) -> dict[int, list[Launch]]:
    """``arch -> the distinct launches the workloads make`` on a GPU of that target (its SM count).

    The models run on fake tensors (shapes, dtypes and strides without data or arithmetic), so a
    step at batch 128 and 224 px costs a fraction of a second. Autocast follows the CPU's
    op lists; CUDA's differ, among the ops these models run under autocast, in ``F.normalize``
    (its norm in fp32): MoCo's keys are then fp32, as in fp32 training, which the workloads cover.
    A workload runs once per arch only when a launch plan reads the SM count; otherwise its launches
    are the same on every GPU and one run serves all archs.
    """
    # What torch.compile traces with; torch has no public name for it.
    from torch._subclasses.fake_tensor import FakeTensorMode

    archs, workloads = list(archs), list(workloads)
    found: dict[int, dict[Launch, None]] = {arch: {} for arch in archs}
    models = {key: _paper_model(*key) for key in dict.fromkeys((w.model, w.fixes, w.backbone) for w in workloads)}
    with FakeTensorMode(), dispatch.BACKEND.using("triton"), recording(jit_functions(kernel_modules())) as launches:
        for work in workloads:
            for arch in archs:
                start = len(launches)
                with dispatch.planning_for_gpu(GPU_SMS[arch]) as plan:
                    _run(models[work.model, work.fixes, work.backbone], work)
                for target in [arch] if plan.sm_count_read else archs:
                    found[target].update(dict.fromkeys(launches[start:]))
                if not plan.sm_count_read:
                    break
    return {arch: list(launches) for arch, launches in found.items()}


def compile_launches(launches: dict[int, Iterable[Launch]], resources: bool = False) -> list[Compiled]:
    """Compiles ``arch -> launches`` (as record_workloads gives) to cubin for sm_<arch>, in one child process.

    Raises KernelCompileError naming each launch that fails, after trying them all.
    """
    jobs = [{"launch": asdict(launch), "arch": arch}
            for arch, arch_launches in launches.items() for launch in dict.fromkeys(arch_launches)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child imports each kernel's module by name: give it the modules this process can import.
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    with tempfile.TemporaryDirectory() as tmp:
        todo, done = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "results.json")
        with open(todo, "w") as f:
            json.dump({"jobs": jobs, "resources": resources}, f)
        proc = subprocess.run([sys.executable, "-m", __name__, todo, done], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the compile process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(done) as f:
            results = json.load(f)
    compiled, failures = [], []
    for job, res in zip(jobs, results):
        launch = _launch_from_json(job["launch"])
        if "error" in res:
            failures.append(f"sm_{job['arch']} {launch.describe()}:\n    {res['error']}")
        else:
            compiled.append(Compiled(launch, job["arch"], **res))
    if failures:
        raise KernelCompileError(f"{len(failures)} of {len(jobs)} compiles failed:\n" + "\n".join(failures))
    return compiled


def _launch_from_json(d: dict) -> Launch:
    return Launch(d["module"], d["name"], *(tuple(tuple(x) for x in d[k])
                                            for k in ("signature", "constexprs", "attrs", "options")))


def _ptxas_resources(ptx: str, arch: int) -> dict:
    """Registers and spills as ``ptxas -v`` reports them, with the flags Triton's CUDA backend uses."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def _compile_one(job: dict, resources: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    launch, arch = _launch_from_json(job["launch"]), job["arch"]
    kernel = getattr(importlib.import_module(launch.module), launch.name)
    if not isinstance(kernel, triton.runtime.JITFunction):
        return {"error": f"{launch.module}.{launch.name} is a {type(kernel).__name__}, not a JITFunction"}
    backend = make_backend(GPUTarget("cuda", arch, 32))
    index = {name: i for i, (name, _) in enumerate(launch.signature)}
    attrs = {(index[name],): backend.parse_attr(key) for name, key in launch.attrs}
    src = triton.compiler.ASTSource(kernel, dict(launch.signature), dict(launch.constexprs), attrs)
    try:
        binary = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as exc:  # each launch reports its own failure; the parent raises for all of them
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[:3000]}"}
    result = {"num_warps": binary.metadata.num_warps, "shared": binary.metadata.shared}
    if resources:
        result.update(_ptxas_resources(binary.asm["ptx"], arch))
    return result


def _main(todo: str, done: str) -> None:
    with open(todo) as f:
        spec = json.load(f)
    results = [_compile_one(job, spec["resources"]) for job in spec["jobs"]]
    with open(done, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _main(*sys.argv[1:])
