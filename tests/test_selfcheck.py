"""The start-up self-check's decisions, on the CPU: a kernel that fails or disagrees with its reference,
a DALI pipeline that cannot run, bf16 on a GPU without it, a compile that fails. Each falls back with
one warning naming the component and the error, or raises FallbackError in strict mode. The passing
kernel case is real: Triton's interpreter runs every op on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py without a GPU).
"""
import importlib
import json
import warnings

import pytest
import torch

from lcr_fast import engine as eng
from lcr_fast import selfcheck, train
from lcr_fast.config import load_config
from lcr_fast.data import build_eval_loader, build_train_loader, checked_loader, data_paths
from lcr_fast.data.dali import _Runner
from lcr_fast.data.torch_loader import TorchTrainLoader
from lcr_fast.errors import FallbackError, run_cli
from lcr_fast.kernels import dispatch
from lcr_fast.models import build_model, compile_backbones
from lcr_fast.models.backbone import ResNetTrunk
from lcr_fast.results import training_markdown

from helpers import config_file, free_port, tiny_config, write_folder

gradcam_module = importlib.import_module("lcr_fast.kernels.gradcam")
pool_module = importlib.import_module("lcr_fast.kernels.rationale_pool")
interpreted = pytest.mark.skipif(not dispatch.INTERPRETED, reason="needs TRITON_INTERPRET=1 (conftest, no GPU)")
pytestmark = pytest.mark.usefixtures("one_thread", "every_op_enabled")


@pytest.fixture
def every_op_enabled():
    """A check disables ops on the process's backend, and tests choose its mode: put both back for the
    tests that follow."""
    with dispatch.BACKEND.using():
        yield


@pytest.fixture
def group_env(monkeypatch):
    """train.main forms (or joins) this process's group from these variables. Set through monkeypatch they
    are gone after the test, so no later test's subprocess inherits a port that this process holds."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("selfcheck"), classes=2, per_class=3, size=40)


def _caught(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught]


# ---- kernels ----

@interpreted
def test_every_triton_op_passes_its_check_in_the_interpreter():
    dispatch.BACKEND.select("triton")
    paths, messages = _caught(selfcheck.check_kernels, "cpu")
    assert paths == {op: "triton (interpreter)" for op in
                     ("gradcam", "rationale_map", "rationale_kl", "infonce_queue", "byol_loss", "rationale_pool")}
    assert messages == [] and dispatch.BACKEND.disabled() == {}


def test_without_cuda_nothing_is_checked_and_the_record_says_why():
    dispatch.BACKEND.select("auto")
    assert set(selfcheck.check_kernels("cpu").values()) == {"torch (no CUDA)"}
    dispatch.BACKEND.select("torch")
    assert set(selfcheck.check_kernels("cpu").values()) == {"torch (LCR_KERNELS=torch)"}


def test_a_disabled_op_takes_its_torch_path_but_stays_visible_to_ahead_of_time_recording():
    dispatch.BACKEND.select("triton")
    x = torch.ones(2)
    dispatch.BACKEND.disable("gradcam", "failed its check")
    assert dispatch.use_triton(x, op="gradcam") is False
    assert dispatch.BACKEND.disabled() == {"gradcam": "failed its check"}
    with dispatch.planning_for_gpu(132):
        assert dispatch.use_triton(x, op="gradcam") is True
    dispatch.BACKEND.enable_all()
    assert dispatch.BACKEND.disabled() == {}


@interpreted
def test_a_kernel_that_raises_falls_back_alone_with_one_warning(monkeypatch):
    dispatch.BACKEND.select("triton")

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(gradcam_module.GradCAMFunction, "apply", broken)
    paths, messages = _caught(selfcheck.check_kernels, "cpu", strict=False)
    assert paths["gradcam"] == ("torch (fallback: RuntimeError: no kernel image is available for execution on the "
                                "device)")
    assert {op for op, path in paths.items() if path != "triton (interpreter)"} == {"gradcam"}
    assert messages == ["kernel gradcam: its Triton path failed the start-up check (RuntimeError: no kernel image is "
                        "available for execution on the device); using its torch reference instead"]
    # From now on the op takes its torch path, even though the mode is triton.
    feat, grad = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    assert torch.equal(selfcheck.K.gradcam(feat, grad), selfcheck.K.gradcam_torch(feat, grad))
    assert set(dispatch.BACKEND.disabled()) == {"gradcam"}


@interpreted
def test_a_kernel_that_disagrees_with_its_reference_falls_back(monkeypatch):
    dispatch.BACKEND.select("triton")
    monkeypatch.setattr(pool_module, "_rationale_pool_triton", lambda feat, att: torch.zeros(feat.shape[:2]))
    paths, messages = _caught(selfcheck.check_kernels, "cpu", strict=False)
    assert paths["rationale_pool"].startswith("torch (fallback: forward: max error ")
    assert len(messages) == 1 and messages[0].startswith("kernel rationale_pool: its Triton path failed")
    assert dispatch.BACKEND.disabled().keys() == {"rationale_pool"}


@interpreted
def test_a_wrong_gradient_is_caught_too(monkeypatch):
    dispatch.BACKEND.select("triton")
    real_backward = gradcam_module.GradCAMFunction.backward
    monkeypatch.setattr(gradcam_module.GradCAMFunction, "backward",
                        staticmethod(lambda ctx, dcam: (2 * real_backward(ctx, dcam)[0], None)))
    paths, _ = _caught(selfcheck.check_kernels, "cpu", strict=False)
    assert paths["gradcam"].startswith("torch (fallback: gradient of input 0: max error ")


@interpreted
def test_strict_mode_and_asking_for_triton_make_a_failing_kernel_an_error(monkeypatch):
    dispatch.BACKEND.select("triton")
    monkeypatch.setattr(pool_module, "_rationale_pool_triton", lambda feat, att: torch.zeros(feat.shape[:2]))
    with pytest.raises(FallbackError, match="kernel rationale_pool: .* forbids falling back"):
        selfcheck.check_kernels("cpu", strict=True)
    # kernels.backend=triton (the mode the trainer then selects) is strict without engine.strict.
    with pytest.raises(FallbackError, match="kernel rationale_pool"):
        selfcheck.start_checks(tiny_config(), torch.device("cpu"))


# ---- data ----

def test_data_paths_try_dali_on_the_gpu_first_then_its_cpu_backend_then_torchvision():
    assert data_paths("dali", "cuda:0") == ["dali-mixed", "dali-cpu", "torchvision"]
    assert data_paths("dali", "cpu") == ["dali-cpu", "torchvision"]
    assert data_paths("torchvision", "cuda:0") == ["torchvision"]


def test_a_mixed_pipeline_that_cannot_build_falls_back_to_dalis_cpu_backend(data):
    """Real: building the GPU pipeline here fails (no CUDA), and the CPU backend takes over."""
    (loader, path), messages = _caught(
        checked_loader, lambda p: build_eval_loader(data, "test", 2, 32, p, "cpu", 1), "dali-mixed", "cpu")
    assert path == "dali-cpu" and len(messages) == 1
    assert messages[0].startswith("data: dali-mixed failed (RuntimeError: ") and "CUDA" in messages[0]
    assert messages[0].endswith("; using dali-cpu instead")
    images = torch.cat([x for x, _ in loader])
    plain = build_eval_loader(data, "test", 2, 32, "dali-cpu", "cpu", 1)
    assert torch.equal(images, torch.cat([x for x, _ in plain]))


def test_a_dali_build_failure_falls_back_to_torchvision_and_strict_raises(data, monkeypatch):
    def no_pipeline(self):
        raise RuntimeError("nvJPEG is not supported on this GPU")

    monkeypatch.setattr(_Runner, "_build", no_pipeline)

    def build(path):
        return build_train_loader(data, "byol", 2, 32, path, "cpu", 0, seed=0)

    (loader, path), messages = _caught(checked_loader, build, "dali", "cpu")
    assert path == "torchvision" and isinstance(loader, TorchTrainLoader)
    assert messages == ["data: dali-cpu failed (RuntimeError: nvJPEG is not supported on this GPU); "
                        "using torchvision instead"]
    with pytest.raises(FallbackError, match=r"data: dali-cpu failed \(RuntimeError: nvJPEG .*engine.strict"):
        checked_loader(build, "dali", "cpu", strict=True)


@pytest.mark.slow
def test_a_working_dali_path_keeps_the_checked_pipeline_for_the_first_epoch(data):
    (loader, path), messages = _caught(
        checked_loader, lambda p: build_train_loader(data, "byol", 2, 32, p, "cpu", 1, seed=0), "dali", "cpu")
    assert path == "dali-cpu" and messages == []
    checked = loader._runner._idle
    assert checked is not None
    fresh = build_train_loader(data, "byol", 2, 32, "dali", "cpu", 1, seed=0)
    for (a1, a2, la), (b1, b2, lb) in zip(loader, fresh, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(la, lb)
    assert loader._runner._idle is checked, "the epoch ran on the pipeline the check built"


# ---- precision ----

def test_bf16_on_a_gpu_without_it_trains_in_fp32_or_fails_in_strict_mode(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    gpu = torch.device("cuda", 0)
    choice, messages = _caught(eng.choose_precision, "bf16", gpu)
    assert choice == eng.PrecisionChoice("fp32", "fallback: engine.precision=bf16 unsupported here")
    assert messages == ["engine.precision=bf16, but this GPU has no native bf16 (compute capability below 8.0): "
                        "training in fp32 instead"]
    assert eng.choose_precision("auto", gpu) == eng.PrecisionChoice(
        "fp32", "auto: this GPU has no native bf16, compute capability below 8.0")
    with pytest.raises(FallbackError, match="engine.strict forbids falling back to fp32"):
        eng.resolve_precision("bf16", gpu, strict=True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert eng.resolve_precision("bf16", gpu) == eng.resolve_precision("auto", gpu) == "bf16"
    assert eng.choose_precision("auto", gpu).reason == \
        "auto: this GPU computes bf16 natively, compute capability 8.0 or up"


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, True, eng.PrecisionChoice("bf16", "auto: this CPU computes bf16 natively with AMX")),
    (False, True, eng.PrecisionChoice("bf16", "auto: this CPU computes bf16 natively with AVX512-BF16")),
    (False, False, eng.PrecisionChoice("fp32", "auto: this CPU has neither AMX nor AVX512-BF16, so no native bf16")),
])
def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_elsewhere(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert eng.choose_precision("auto", cpu) == expected
    assert eng.native_bf16(cpu) == (expected.precision == "bf16")
    choice, messages = _caught(eng.choose_precision, "fp32", cpu, strict=True)
    assert choice == eng.PrecisionChoice("fp32", "engine.precision=fp32") and messages == []


def test_explicit_bf16_on_a_cpu_without_it_runs_as_asked_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    choice, messages = _caught(eng.choose_precision, "bf16", torch.device("cpu"), strict=True)
    assert choice == eng.PrecisionChoice("bf16",
                                         "engine.precision=bf16, emulated: this CPU has neither AMX nor AVX512-BF16")
    assert len(messages) == 1 and "emulated here and many times slower than fp32" in messages[0]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    choice, messages = _caught(eng.choose_precision, "bf16", torch.device("cpu"))
    assert choice == eng.PrecisionChoice("bf16", "engine.precision=bf16") and messages == []


def test_this_machine_reports_what_its_cpu_flags_say():
    """torch's view of the CPU agrees with the kernel's flags, so ``auto`` decides on the hardware it runs on."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    expected = "AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert eng.cpu_bf16_instructions() == expected


def test_engine_strict_is_a_validated_bool():
    assert load_config(None)["engine"]["strict"] is False
    assert load_config(None, ["engine.strict=true"]).engine.strict is True
    with pytest.raises(ValueError, match="engine.strict must be one of"):
        load_config(None, ["engine.strict=yes please"])


# ---- compile ----

def _trunks(model):
    return [m for m in model.modules() if isinstance(m, ResNetTrunk)]


@pytest.mark.slow
def test_a_compile_that_fails_puts_the_trunks_back_to_eager(monkeypatch, fresh_dynamo):
    cfg = tiny_config()
    model = build_model(cfg)

    def failing_backend(graph, example_inputs):
        raise RuntimeError("inductor: no C++ compiler")

    for trunk in _trunks(model):
        trunk.forward = torch.compile(trunk.forward, backend=failing_backend)
    with pytest.raises(FallbackError, match="engine.compile=default failed .*no C.. compiler.*engine.strict"):
        selfcheck.check_compile(model, "default", 2, 32, True, "fp32", torch.device("cpu"), strict=True)
    path, messages = _caught(selfcheck.check_compile, model, "default", 2, 32, True, "fp32", torch.device("cpu"))
    assert path.startswith("eager (fallback: BackendCompilerFailed: ") and "no C++ compiler" in path
    assert len(messages) == 1 and "the ResNet trunks run eagerly instead" in messages[0]
    assert all("forward" not in vars(trunk) for trunk in _trunks(model))
    model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))["loss"].backward()


@pytest.mark.slow
def test_a_compile_that_works_leaves_no_trace_of_the_check(fresh_dynamo):
    """aot_eager traces and runs AOT autograd like inductor, without generating code: seconds on a CPU."""
    torch.manual_seed(0)
    model = build_model(tiny_config())
    compile_backbones(model, "aot_eager")
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    assert selfcheck.check_compile(model, "aot_eager", 2, 32, True, "fp32", torch.device("cpu")) == "aot_eager"
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items()), "BN statistics put back"
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" in vars(trunk) for trunk in _trunks(model)), "still compiled"
    assert selfcheck.check_compile(model, "none", 2, 32, True, "fp32", torch.device("cpu")) == "none"


# ---- the record, end to end ----

def test_the_report_renders_the_components():
    components = selfcheck.Components("cuda:0 (NVIDIA H200)", False, "bf16", "auto: this GPU computes bf16 natively",
                                      {"gradcam": "triton", "rationale_map": "triton",
                                       "infonce_queue": "torch (fallback: RuntimeError: x)"}, 0.25, "dali-mixed",
                                      "default")
    record = components.to_dict()
    assert record == {"device": "cuda:0 (NVIDIA H200)", "strict": False,
                      "kernels": {"gradcam": "triton", "rationale_map": "triton",
                                  "infonce_queue": "torch (fallback: RuntimeError: x)"},
                      "kernel_check_s": 0.25, "data": "dali-mixed",
                      "precision": "bf16 (auto: this GPU computes bf16 natively)", "compile": "default"}
    markdown = training_markdown({"name": "run", "components": record})
    assert ("- components on cuda:0 (NVIDIA H200): data dali-mixed, precision bf16 (auto: this GPU computes bf16 "
            "natively), compile default\n") in markdown
    assert ("- kernels: triton (gradcam, rationale_map); torch (fallback: RuntimeError: x) (infonce_queue)\n"
            in markdown)


@pytest.mark.slow
def test_a_training_run_records_the_path_of_each_component(tmp_path, monkeypatch, group_env):
    monkeypatch.delenv("LCR_KERNELS", raising=False)  # the config's kernels.backend decides
    write_folder(tmp_path / "data", classes=2, per_class=4, size=40)
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 1, "num_epochs": 1, "warmup_epochs": 0},
                           engine={"deterministic": False}, logger={"tensorboard": False, "matplotlib": False})
    args = ["-c", str(cfg_path), "--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "run"),
            "--ckpt_dir", str(tmp_path / "run" / "ckpt"), "--hide_progress"]
    results = train.main(args)
    auto = eng.choose_precision("auto", torch.device("cpu"))  # bf16 on a CPU with AMX or AVX512-BF16
    precision = f"{auto.precision} ({auto.reason})"
    # The Triton ops take their torch path without CUDA; the trunks' BatchNorm runs the fused CPU operator.
    kernels = {op: "torch (no CUDA)" for op in selfcheck.OP_CASES}
    kernels["batch_norm_act"] = f"cpu (C++, {torch.backends.cpu.get_cpu_capability()})"
    expected = {"device": "cpu", "strict": False, "kernels": kernels, "data": "torchvision", "precision": precision,
                "compile": "none"}
    recorded = json.loads((tmp_path / "run" / "components.json").read_text())
    assert {k: v for k, v in recorded.items() if k != "kernel_check_s"} == expected
    assert {k: v for k, v in results["components"].items() if k != "kernel_check_s"} == expected
    assert f"- components on cpu: data torchvision, precision {precision}, compile none" in \
        (tmp_path / "run" / "report.md").read_text()


def test_strict_mode_ends_the_cli_with_one_line_naming_the_failed_path(tmp_path, monkeypatch, capsys, group_env):
    def no_pipeline(self):
        raise RuntimeError("nvJPEG is not supported on this GPU")

    monkeypatch.setattr(_Runner, "_build", no_pipeline)
    monkeypatch.delenv("LCR_KERNELS", raising=False)  # the config's kernels.backend decides
    write_folder(tmp_path / "data", classes=2, per_class=4, size=40)
    cfg_path = config_file(tmp_path, data={"backend": "dali"}, engine={"strict": True, "deterministic": False})
    args = ["-c", str(cfg_path), "--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "run"),
            "--ckpt_dir", str(tmp_path / "run" / "ckpt")]
    assert run_cli(train.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data: dali-cpu failed (RuntimeError: nvJPEG is not supported on this GPU); engine.strict forbids "
        "falling back")
