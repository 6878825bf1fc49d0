"""What the package declares (pyproject.toml: ranges) and what `make install` pins (constraints.txt) agree."""
import os
import shutil
import subprocess
import time

import pytest
from packaging.requirements import Requirement

from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exact versions: {line}"
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


def _requirements(*extras: str) -> list[Requirement]:
    project = _project()
    lines = project["dependencies"] + [line for extra in extras for line in project["optional-dependencies"][extra]]
    return [Requirement(line) for line in lines]


def test_make_install_pins_every_requirement_inside_its_declared_range():
    pins = _pins()
    for req in _requirements("cuda13", "test"):
        name = req.name.lower()
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")


def test_torch_is_a_range_and_dali_comes_for_either_cuda():
    deps = {req.name: req for req in _requirements()}
    assert not any(spec.operator == "==" for req in deps.values() for spec in req.specifier), "no exact pins"
    assert deps["torch"].specifier.contains("2.6.0") and not deps["torch"].specifier.contains("2.5.1")
    assert deps["torch"].specifier.contains("2.99") and not deps["torch"].specifier.contains("3.0")
    assert not any(name.startswith("nvidia-dali") for name in deps), "DALI belongs to an extra"
    extras = _project()["optional-dependencies"]
    assert any(line.startswith("nvidia-dali-cuda120") for line in extras["cuda12"])
    assert any(line.startswith("nvidia-dali-cuda130") for line in extras["cuda13"])


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize("edited", ["pyproject.toml", "setup.py", "constraints.txt"])
def test_make_install_reruns_with_the_constraints_when_what_it_installs_changes(tmp_path, edited):
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed"
    stamp.touch()
    later = time.time() + 60
    os.utime(stamp, (later, later))
    make = ["make", "-n", "-C", str(REPO), f"VENV={venv}", "install"]
    quiet = subprocess.run(make, capture_output=True, text=True, check=True, timeout=60).stdout
    assert "pip install" not in quiet
    planned = subprocess.run([*make, "-W", edited], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "pip install --quiet -c constraints.txt -e '.[cuda13,test]'" in planned
