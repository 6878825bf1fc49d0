"""lcr-prepare on tiny fakes of each official layout: splits, label order, link modes, damaged sources, --force."""
import errno
import json
import os
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from lcr_fast.data import prepare as prep
from lcr_fast.data.folder import scan_split

from helpers import run_command

# CUB: class id -> official name; image id -> (class id, 1 train | 0 test). Class 3 has no test image.
CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross"}
CUB_IMAGES = {1: (1, 1), 2: (1, 0), 3: (2, 1), 4: (2, 0), 5: (2, 0), 6: (3, 1), 7: (3, 1)}
CARS_CLASSES = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "Acura RL Sedan 2012"]
CARS_TRAIN = [("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 3), ("00004.jpg", 2)]
CARS_TEST = [("00001.jpg", 1), ("00002.jpg", 2)]
AIRCRAFT_VARIANTS = {"727-200": ("Boeing 727", "Boeing"), "737-200": ("Boeing 737", "Boeing"),
                     "737-300": ("Boeing 737", "Boeing"), "F-16A/B": ("F-16A/B", "General Dynamics")}
AIRCRAFT_TRAINVAL = [("0034309", "737-300"), ("0056978", "F-16A/B"), ("1025794", "727-200"), ("0062765", "737-200")]
AIRCRAFT_TEST = [("0041121", "F-16A/B"), ("0069432", "737-200")]


def _jpeg(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 255 - shade, 0)).save(path, "JPEG")


def _cub_path(image_id):
    class_id = CUB_IMAGES[image_id][0]
    return f"{CUB_CLASSES[class_id]}/{CUB_CLASSES[class_id][4:]}_{image_id:04d}.jpg"


def make_cub(root):
    """A fake CUB_200_2011/ under root; classes.txt lists the classes out of id order."""
    base = root / "CUB_200_2011"
    for image_id in CUB_IMAGES:
        _jpeg(base / "images" / _cub_path(image_id), 30 * image_id)
    base.joinpath("images.txt").write_text("".join(f"{i} {_cub_path(i)}\n" for i in CUB_IMAGES))
    base.joinpath("image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, (c, _) in CUB_IMAGES.items()))
    base.joinpath("train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, (_, t) in CUB_IMAGES.items()))
    base.joinpath("classes.txt").write_text("".join(f"{c} {CUB_CLASSES[c]}\n" for c in (2, 1, 3)))
    return base


def make_cars(root):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS_CLASSES], dtype=object)})
    for folder, rows, mat in (("cars_train", CARS_TRAIN, base / "devkit" / "cars_train_annos.mat"),
                              ("cars_test", CARS_TEST, base / "cars_test_annos_withlabels.mat")):
        # The official struct array: one entry per image, its box, its 1-based class and its file name.
        annotations = np.zeros((1, len(rows)), dtype=[(name, "O") for name in
                                                       ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")])
        for i, (fname, class_id) in enumerate(rows):
            annotations[0, i] = (np.uint8(1), np.uint8(1), np.uint8(7), np.uint8(7), np.uint8(class_id), fname)
            _jpeg(base / folder / fname, 40 * i + 10 * class_id)
        scipy.io.savemat(mat, {"annotations": annotations})
    return base


def make_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = list(AIRCRAFT_VARIANTS)
    families = list(dict.fromkeys(family for family, _ in AIRCRAFT_VARIANTS.values()))
    makers = list(dict.fromkeys(maker for _, maker in AIRCRAFT_VARIANTS.values()))
    data.mkdir(parents=True)
    for filename, names in (("variants.txt", variants), ("families.txt", families), ("manufacturers.txt", makers)):
        data.joinpath(filename).write_text("".join(f"{name}\n" for name in names))
    for split, rows in (("trainval", AIRCRAFT_TRAINVAL), ("test", AIRCRAFT_TEST)):
        for level, pick in (("variant", lambda v: v), ("family", lambda v: AIRCRAFT_VARIANTS[v][0]),
                            ("manufacturer", lambda v: AIRCRAFT_VARIANTS[v][1])):
            data.joinpath(f"images_{level}_{split}.txt").write_text("".join(f"{i} {pick(v)}\n" for i, v in rows))
        for n, (image_id, _) in enumerate(rows):
            _jpeg(data / "images" / f"{image_id}.jpg", 50 * n)
    return data


def run(capsys, *argv):
    rc = prep.main([*map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, *names):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]


def files_by_class(dst, split):
    return {folder.name: sorted(p.name for p in folder.iterdir()) for folder in sorted((dst / split).iterdir())}


def check_cub(dst, src):
    folders = list(CUB_CLASSES.values())
    expected = {split: {folder: [] for folder in folders} for split in ("train", "test")}
    for image_id, (class_id, train) in CUB_IMAGES.items():
        expected["train" if train else "test"][CUB_CLASSES[class_id]].append(_cub_path(image_id).split("/")[1])
    for split in ("train", "test"):
        assert files_by_class(dst, split) == {k: sorted(v) for k, v in expected[split].items()}
    # The trainer's index: sorted folder k holds the images of official class k + 1.
    index = scan_split(dst, "train")
    assert index.classes == folders
    for path, label in index.samples:
        image_id = int(path[-8:-4])
        assert CUB_IMAGES[image_id][0] == label + 1
    info = json.loads((dst / "prepare.json").read_text())
    assert info == {"dataset": "cub200", "source": str(src), "level": None, "link": info["link"],
                    "counts": {"train": 4, "test": 3}, "num_classes": 3, "classes": folders,
                    "official_counts": False}
    return info


def test_class_folder_names_sort_in_official_order_and_are_single_components():
    names = prep.class_folder_names(["002.Zebra", "Ram C/V Cargo Van Minivan 2012", "F-16A/B", "A  b"])
    assert names == ["001.002.Zebra", "002.Ram_C_V_Cargo_Van_Minivan_2012", "003.F-16A_B", "004.A_b"]
    assert prep.class_folder_names(["001.Black_footed_Albatross", "002.Laysan_Albatross"]) == \
        ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    many = prep.class_folder_names([f"class {i}" for i in range(1000)])
    assert many[0] == "0001.class_0" and sorted(many) == many


def test_cub_folder_split_labels_and_report(tmp_path, capsys):
    base = make_cub(tmp_path / "src")
    rc, out, err = run(capsys, "cub200", base, tmp_path / "dst")
    assert rc == 0, err
    info = check_cub(tmp_path / "dst", base)
    assert info["link"] == "hardlink"
    assert out.strip() == f"prepared cub200: 4 train + 3 test images in 3 classes -> {tmp_path / 'dst'} (hardlink)"
    assert "warning: " in err and "expected 5994 train / 5794 test images in 200 classes, found 4 / 3 in 3" in err


def test_cub_parent_folder_and_archive(tmp_path, capsys):
    make_cub(tmp_path / "src")
    assert run(capsys, "cub200", tmp_path / "src", tmp_path / "from_parent")[0] == 0
    check_cub(tmp_path / "from_parent", tmp_path / "src")
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "CUB_200_2011", arcname="CUB_200_2011")
    rc, _, err = run(capsys, "cub200", archive, tmp_path / "from_tgz")
    assert rc == 0, err
    info = check_cub(tmp_path / "from_tgz", archive)
    assert info["link"] == "copy"
    assert sorted(os.listdir(tmp_path / "from_tgz")) == ["prepare.json", "test", "train"]  # nothing else left behind
    rc, _, err = run(capsys, "cub200", archive, tmp_path / "tgz_symlink", "--link", "symlink")
    assert_one_error(rc, err, "--link symlink", str(archive))


def test_cars_mat_files_and_path_safe_names(tmp_path, capsys):
    make_cars(tmp_path / "src")
    for src, dst in ((tmp_path / "src" / "stanford_cars", tmp_path / "dst"), (tmp_path / "src", tmp_path / "dst2")):
        rc, out, err = run(capsys, "stanfordcars", src, dst)
        assert rc == 0, err
        assert "expected 8144 train / 8041 test images in 196 classes, found 4 / 2 in 3" in err
    folders = ["001.AM_General_Hummer_SUV_2000", "002.Ram_C_V_Cargo_Van_Minivan_2012", "003.Acura_RL_Sedan_2012"]
    dst = tmp_path / "dst"
    assert files_by_class(dst, "train") == {folders[0]: ["00002.jpg"], folders[1]: ["00001.jpg", "00004.jpg"],
                                            folders[2]: ["00003.jpg"]}
    assert files_by_class(dst, "test") == {folders[0]: ["00001.jpg"], folders[1]: ["00002.jpg"], folders[2]: []}
    # Same file name in both splits: each split links its own image.
    src = tmp_path / "src" / "stanford_cars"
    assert os.stat(dst / "test" / folders[0] / "00001.jpg").st_ino == os.stat(src / "cars_test" / "00001.jpg").st_ino
    info = json.loads((dst / "prepare.json").read_text())
    assert info["classes"] == folders and info["counts"] == {"train": 4, "test": 2} and info["num_classes"] == 3
    assert info["dataset"] == "stanfordcars" and info["official_counts"] is False


def test_aircraft_variant_and_family_levels(tmp_path, capsys):
    make_aircraft(tmp_path / "src")
    rc, out, err = run(capsys, "aircraft", tmp_path / "src" / "fgvc-aircraft-2013b", tmp_path / "variant")
    assert rc == 0, err
    assert "aircraft (variant)" in err and "expected 6667 train / 3333 test images in 100 classes, found 4 / 2" in err
    variants = ["001.727-200", "002.737-200", "003.737-300", "004.F-16A_B"]
    assert files_by_class(tmp_path / "variant", "train") == {
        variants[0]: ["1025794.jpg"], variants[1]: ["0062765.jpg"], variants[2]: ["0034309.jpg"],
        variants[3]: ["0056978.jpg"]}
    assert files_by_class(tmp_path / "variant", "test") == {
        variants[0]: [], variants[1]: ["0069432.jpg"], variants[2]: [], variants[3]: ["0041121.jpg"]}
    assert json.loads((tmp_path / "variant" / "prepare.json").read_text())["level"] == "variant"

    rc, out, err = run(capsys, "aircraft", tmp_path / "src", tmp_path / "family", "--level", "family")
    assert rc == 0, err
    assert "in 70 classes, found 4 / 2 in 3" in err and out.startswith("prepared aircraft (family): 4 train + 2 test")
    families = ["001.Boeing_727", "002.Boeing_737", "003.F-16A_B"]
    assert files_by_class(tmp_path / "family", "train") == {
        families[0]: ["1025794.jpg"], families[1]: ["0034309.jpg", "0062765.jpg"], families[2]: ["0056978.jpg"]}
    info = json.loads((tmp_path / "family" / "prepare.json").read_text())
    assert info["level"] == "family" and info["classes"] == families and info["counts"] == {"train": 4, "test": 2}

    rc, _, err = run(capsys, "cub200", tmp_path / "src", tmp_path / "x", "--level", "family")
    assert_one_error(rc, err, "--level")


def test_link_modes(tmp_path, capsys, monkeypatch):
    base = make_cub(tmp_path / "src")
    source = base / "images" / _cub_path(1)
    target = lambda dst: dst / "train" / CUB_CLASSES[1] / source.name  # noqa: E731
    for mode in ("symlink", "hardlink", "copy"):
        rc, _, err = run(capsys, "cub200", base, tmp_path / mode, "--link", mode)
        assert rc == 0, err
        assert json.loads((tmp_path / mode / "prepare.json").read_text())["link"] == mode
        assert target(tmp_path / mode).read_bytes() == source.read_bytes()
    assert os.path.islink(target(tmp_path / "symlink")) and os.readlink(target(tmp_path / "symlink")) == str(source)
    assert os.stat(target(tmp_path / "hardlink")).st_ino == os.stat(source).st_ino
    assert not os.path.islink(target(tmp_path / "copy"))
    assert os.stat(target(tmp_path / "copy")).st_ino != os.stat(source).st_ino

    # Another file system: the default falls back to copies, an explicit hardlink request is refused.
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(prep.os, "link", cross_device)
    rc, _, err = run(capsys, "cub200", base, tmp_path / "auto")
    assert rc == 0, err
    assert json.loads((tmp_path / "auto" / "prepare.json").read_text())["link"] == "copy"
    assert os.stat(target(tmp_path / "auto")).st_ino != os.stat(source).st_ino
    rc, _, err = run(capsys, "cub200", base, tmp_path / "forced_hardlink", "--link", "hardlink")
    assert err.startswith("warning: ")  # the source was fine; the failure came while writing
    assert_one_error(rc, err.split("\n", 1)[1], "cross-device", "--link copy")


def test_non_empty_destination_needs_force(tmp_path, capsys):
    base = make_cub(tmp_path / "src")
    dst = tmp_path / "dst"
    (dst / "train" / "stale_class").mkdir(parents=True)
    (dst / "train" / "stale_class" / "old.jpg").write_bytes(b"old")
    (dst / "notes.txt").write_text("keep me")
    rc, _, err = run(capsys, "cub200", base, dst)
    assert_one_error(rc, err, str(dst), "--force")
    assert (dst / "train" / "stale_class" / "old.jpg").exists()
    rc, _, err = run(capsys, "cub200", base, dst, "--force")
    assert rc == 0, err
    check_cub(dst, base)
    assert (dst / "notes.txt").read_text() == "keep me"
    # --force never deletes the source it reads.
    inside = make_cub(tmp_path / "dst2" / "train")
    rc, _, err = run(capsys, "cub200", inside, tmp_path / "dst2", "--force")
    assert_one_error(rc, err, "--force would delete")
    assert (inside / "images.txt").exists()


def test_damaged_cub_sources(tmp_path, capsys):
    cases = {
        "missing": lambda b: (b / "train_test_split.txt").unlink(),
        "garbled": lambda b: (b / "image_class_labels.txt").write_text("1 1\n2 1\n3\n"),
        "bad_flag": lambda b: (b / "train_test_split.txt").write_text("1 1\n2 yes\n"),
        "no_image": lambda b: (b / "images" / _cub_path(4)).unlink(),
        "no_label": lambda b: (b / "image_class_labels.txt").write_text("1 1\n2 1\n"),
        "bad_class": lambda b: (b / "image_class_labels.txt").write_text(
            "".join(f"{i} {9 if i == 5 else c}\n" for i, (c, _) in CUB_IMAGES.items())),
        "binary": lambda b: (b / "classes.txt").write_bytes(b"\xff\xfe\x00garbage"),
    }
    expect = {"missing": ("train_test_split.txt", "missing"), "garbled": ("image_class_labels.txt", "line 3"),
              "bad_flag": ("train_test_split.txt", "line 2"), "no_image": ("images.txt", _cub_path(4)),
              "no_label": ("image_class_labels.txt", "image id 3"), "bad_class": ("image_class_labels.txt", "class 9"),
              "binary": ("classes.txt",)}
    for name, damage in cases.items():
        base = make_cub(tmp_path / name)
        damage(base)
        rc, _, err = run(capsys, "cub200", base, tmp_path / f"{name}_dst")
        assert_one_error(rc, err, *expect[name])
        assert not (tmp_path / f"{name}_dst").exists()  # refused before anything was written
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    assert_one_error(*run(capsys, "cub200", broken, tmp_path / "broken_dst")[::2], str(broken))


def test_damaged_cars_and_aircraft_sources(tmp_path, capsys):
    base = make_cars(tmp_path / "cars")
    (base / "devkit" / "cars_meta.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    assert_one_error(*run(capsys, "stanfordcars", base, tmp_path / "d1")[::2], "cars_meta.mat")
    base = make_cars(tmp_path / "cars2")
    (base / "cars_test_annos_withlabels.mat").write_bytes(b"\x00" * 64)
    assert_one_error(*run(capsys, "stanfordcars", base, tmp_path / "d2")[::2], "cars_test_annos_withlabels.mat")
    base = make_cars(tmp_path / "cars3")
    (base / "cars_train" / "00003.jpg").unlink()
    assert_one_error(*run(capsys, "stanfordcars", base, tmp_path / "d3")[::2], "cars_train_annos.mat", "00003.jpg")
    base = make_cars(tmp_path / "cars4")
    (base / "devkit" / "cars_train_annos.mat").unlink()
    assert_one_error(*run(capsys, "stanfordcars", base, tmp_path / "d4")[::2], "missing", "cars_train_annos.mat")

    data = make_aircraft(tmp_path / "air")
    (data / "images_variant_test.txt").write_text("0041121 F-16A/B\n0069432\n")
    assert_one_error(*run(capsys, "aircraft", data.parent, tmp_path / "d5")[::2], "images_variant_test.txt", "line 2")
    data = make_aircraft(tmp_path / "air2")
    (data / "images_family_trainval.txt").write_text("0034309 Boeing 747\n")
    assert_one_error(*run(capsys, "aircraft", data.parent, tmp_path / "d6", "--level", "family")[::2],
                     "images_family_trainval.txt", "'Boeing 747'")
    data = make_aircraft(tmp_path / "air3")
    (data / "images" / "0056978.jpg").unlink()
    assert_one_error(*run(capsys, "aircraft", data.parent, tmp_path / "d7")[::2], "images_variant_trainval.txt",
                     "0056978.jpg")
    data = make_aircraft(tmp_path / "air4")
    (data / "manufacturers.txt").unlink()
    assert_one_error(*run(capsys, "aircraft", data.parent, tmp_path / "d8", "--level", "manufacturer")[::2],
                     "manufacturers.txt")
    assert not any((tmp_path / f"d{i}").exists() for i in range(1, 9))


def test_unknown_dataset_and_missing_source(tmp_path, capsys):
    make_cub(tmp_path / "src")
    assert_one_error(*run(capsys, "cub201", tmp_path / "src", tmp_path / "dst")[::2], "cub201")
    assert_one_error(*run(capsys, "cub200", tmp_path / "nowhere", tmp_path / "dst")[::2], "nowhere", "does not exist")
    assert_one_error(*run(capsys, "stanfordcars", tmp_path / "src", tmp_path / "dst")[::2], "stanford_cars")
    assert_one_error(*run(capsys, "cub200", tmp_path / "src", tmp_path / "dst", "--link", "move")[::2], "move")


@pytest.mark.slow
def test_module_run_exits_2_without_traceback(tmp_path):
    base = make_cub(tmp_path / "src")
    (base / "images.txt").write_text("1 " + _cub_path(1) + "\n2\n")
    proc = run_command("-m", "lcr_fast.data.prepare", "cub200", base, tmp_path / "dst", env={"OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "images.txt line 2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
