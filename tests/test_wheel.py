"""An installed package, not only a clone: the wheel built from the project carries the configs and
the command lines, and they work from a fresh virtual environment, away from the source tree."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = root.glob("lcr_fast-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    # No network: the dependencies are this test environment's, seen through a .pth file (which does not
    # run the .pth files of that folder, so the editable install of the source tree stays out of sight).
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "test-deps.pth").write_text(sysconfig.get_path("purelib"))
    # With its dependencies and the make install's extras, under constraints.txt: the wheel's declared
    # ranges must admit the pinned versions, which are all there already (no index is asked).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-index",
                    "-q", "-c", str(REPO / "constraints.txt"), f"{wheel}[cuda13,test]"], check=True,
                   capture_output=True, timeout=600)
    return wheel, venv


def test_the_wheel_holds_the_configs_and_the_kernels(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "lcr_fast/configs/byol_cub200.yaml" in names and "lcr_fast/configs/moco_demo.yaml" in names
    assert "lcr_fast/kernels/infonce.py" in names and "lcr_fast/kernels/cpu/batch_norm_act.cpp" in names


def test_installed_commands_run_outside_the_source_tree(installed, tmp_path):
    _, venv = installed
    listed = subprocess.run([str(venv / "bin" / "lcr-train"), "--list-configs"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert listed.returncode == 0, listed.stderr
    rows = dict(line.split(maxsplit=1) for line in listed.stdout.splitlines())
    assert {"byol_cub200", "byol_stanfordcars", "byol_aircrafts", "moco_cub200", "demo"} <= set(rows)
    assert rows["byol_cub200"].startswith(str(venv)), "the packaged file, not the clone's"
    helped = subprocess.run([str(venv / "bin" / "lcr-prepare"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert helped.returncode == 0 and "cub200" in helped.stdout
    named = subprocess.run([str(venv / "bin" / "python"), "-c", "from lcr_fast.config import load_config; "
                            "print(load_config('byol_cub200').model.backbone)"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert named.stdout.strip() == "resnet50_cub200", named.stderr
    # The fused CPU BatchNorm builds from the packaged C++ source (in a cache of its own: sharing the clone's,
    # the two builds, which differ by their include paths, would replace each other).
    built = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib; m = importlib.import_module("
                            "'lcr_fast.kernels.batch_norm_act'); print(m.operator_available(), m.SOURCE)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600,
                           env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")})
    available, source = built.stdout.split()
    assert available == "True" and source.startswith(str(venv)), built.stderr
