"""Every Triton kernel compiles to cubin for sm_80 and sm_90 at every launch the paper's runs make.

The interpreter tests run code that the compiler may refuse; here the launches of every registered
method's training steps and of ``model.extract`` (224 px, batch 128 and 16 per GPU, fp32 and bf16 autocast,
both memory formats, reference and corrected modes; layer4 of 2048 and of 512 channels) are recorded
from the ops' own launchers and compiled with Triton's compiler and the wheel's ptxas, with no GPU
(lcr_fast.kernel_aot).
"""
import ast
import inspect
import re
import textwrap

import pytest
import torch

import broken_kernel
from lcr_fast import kernel_aot as aot
from lcr_fast.kernels import dispatch

# Cold (256 compiles) the module takes about a minute on two shared cores; with Triton's cache warm, 20 s.
pytestmark = pytest.mark.slow

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def launches() -> dict[int, list[aot.Launch]]:
    return aot.record_workloads(archs=ARCHS)


def _constexprs(launches: list[aot.Launch], name: str, key: str) -> set:
    return {dict(launch.constexprs).get(key) for launch in launches if launch.name == name}


def _types(launches: list[aot.Launch], name: str, param: str) -> set:
    return {dict(launch.signature)[param] for launch in launches if launch.name == name}


def test_every_kernel_that_can_be_launched_is_recorded(launches):
    functions = aot.jit_functions(aot.kernel_modules())
    names = {(f.fn.__module__, f.fn.__name__) for f in functions}
    helpers = set()
    for f in functions:
        body = ast.parse(textwrap.dedent(inspect.getsource(f.fn)))
        used = {node.id for node in ast.walk(body) if isinstance(node, ast.Name)} - {f.fn.__name__}
        helpers |= {(f.fn.__module__, name) for name in used} & names
    for arch in ARCHS:
        assert {(launch.module, launch.name) for launch in launches[arch]} == names - helpers
    assert len(names - helpers) == 14


def test_recording_sees_the_papers_shapes_and_dtypes(launches):
    got = launches[90]
    # h*w = 196 (BYOL, 14x14) and 49 (MoCo, 7x7) in blocks of at most 128
    assert _constexprs(got, "_rmap_reduce_kernel", "BLOCK_S") == {128, 64}
    # whole-batch min/max blocks for batches of 256, 128, 37 (64), 16 and 1 (16, the floor); B = 1 is folded in
    assert _constexprs(got, "_rmap_norm_kernel", "BLOCK_B") == {256, 128, 64, 16}
    assert _constexprs(got, "_rmap_norm_kernel", "B") == {None, 1}
    assert _constexprs(got, "_rmap_norm_kernel", "GLOBAL") == {True, False}
    # detector output in fp32 training and under bf16 autocast; GradCAM always on the fp32 head copy
    assert _types(got, "_rmap_reduce_kernel", "y_ptr") == {"*fp32", "*bf16"}
    assert _types(got, "_gradcam_fwd_kernel", "feat_ptr") == {"*fp32"}
    # channels_last (channel stride 1) and contiguous (pixel stride 1) layer4 maps
    assert {tuple(sorted(k for k, _ in launch.constexprs if k.startswith("f_")))
            for launch in got if launch.name == "_gradcam_fwd_kernel"} == {("f_sc",), ("f_ss",)}
    # MoCo's queue in fp32 with 3xTF32 products, rows KL over w = 7 and flattened over 49
    assert _constexprs(got, "_infonce_fwd_kernel", "PREC") == {"tf32x3"}
    assert _types(got, "_infonce_fwd_kernel", "queue_ptr") == {"*fp32"}
    assert _constexprs(got, "_kl_fwd_kernel", "BLOCK_N") == {256, 16, 64}
    # the symmetric cosine over BYOL's 256-d and SimSiam's 2048-d projections
    assert _constexprs(got, "_byol_fwd_kernel", "BLOCK_D") == {256, 2048}
    # features of 2048 channels (ResNet-50 and wider, blocks of 1024) and 512 (ResNet-18 and -34), fp32 and bf16
    assert _constexprs(got, "_normalize_kernel", "BLOCK") == {1024, 512}
    assert {(dict(launch.constexprs)["BLOCK"], dict(launch.signature)["out_ptr"])
            for launch in got if launch.name == "_normalize_kernel"} == {
        (block, dtype) for block in (1024, 512) for dtype in ("*fp32", "*bf16")}


def test_every_launch_compiles(launches):
    compiled = aot.compile_launches(launches)
    for arch in ARCHS:
        assert len([c for c in compiled if c.arch == arch]) == len(launches[arch]) > 100
    assert {c.num_warps for c in compiled} == {4, 8}


def test_queue_kernels_fit_in_registers(launches):
    """The tiling in kernels/infonce.py: 3xTF32 doubles every operand, and the first tiling spilled."""
    queue_kernels = {arch: [launch for launch in launches[arch]
                            if launch.name in ("_infonce_fwd_kernel", "_infonce_bwd_kernel")] for arch in ARCHS}
    for c in aot.compile_launches(queue_kernels, resources=True):
        assert c.spill_stores == c.spill_loads == 0, c.launch.describe()
        assert c.registers <= 192 and c.shared <= 48 * 1024, c.launch.describe()


@pytest.mark.skipif(not dispatch.INTERPRETED, reason="the interpreter half needs TRITON_INTERPRET=1")
def test_the_interpreter_runs_kernels_the_compiler_refuses():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(broken_kernel.sum_first(x, 2), 2 * x)
    assert torch.equal(broken_kernel.add_one(x), x + 1)


def test_kernels_the_compiler_refuses_fail_the_compile_check():
    with aot.recording([broken_kernel._sum_first_kernel, broken_kernel._add_one_kernel]) as recorded:
        broken_kernel.sum_first(torch.zeros(3), 2)
        broken_kernel.add_one(torch.zeros(3))
    assert [launch.name for launch in recorded] == ["_sum_first_kernel", "_add_one_kernel"]
    with pytest.raises(aot.KernelCompileError) as failure:
        aot.compile_launches({80: recorded, 90: recorded})
    message = str(failure.value)
    assert message.startswith("4 of 4 compiles failed")
    failures = re.split(r"\n(?=sm_\d+ _)", message)[1:]
    assert sorted(f.split("(")[0] for f in failures) == [
        "sm_80 _add_one_kernel", "sm_80 _sum_first_kernel", "sm_90 _add_one_kernel", "sm_90 _sum_first_kernel"]
    for f in failures:
        assert ("unsupported AST node type: Break" if "_sum_first_kernel" in f else "_plus_one") in f
