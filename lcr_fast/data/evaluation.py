"""Which labeled images evaluate a run: those of its ``--data_dir`` in the reference's layout, those of a
separate ``--eval_data_dir``, or none (the run trains on unlabeled images and is not evaluated)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .folder import DatasetError, FolderIndex, check_same_classes, scan_split


@dataclass
class Evaluation:
    """The labeled splits a run is evaluated on (kNN monitor, retrieval, linear evaluation, heatmaps), or
    why it is not (``skipped``)."""

    data_dir: str | None
    bank: FolderIndex | None = None  # train/: the kNN bank and the linear evaluation's training images
    test: FolderIndex | None = None
    skipped: str | None = None

    def to_dict(self) -> dict:
        """What results.json records under "evaluation"."""
        if self.skipped:
            return {"data_dir": None, "skipped": self.skipped}
        return {"data_dir": self.data_dir, "train_images": len(self.bank), "test_images": len(self.test),
                "num_classes": len(self.test.classes)}


def evaluation_data(data_dir: str | os.PathLike, train: FolderIndex,
                    eval_data_dir: str | os.PathLike | None = None) -> Evaluation:
    """The evaluation of a run that trains on ``train`` (the training images of ``data_dir``).

    ``eval_data_dir`` (train/ and test/ with class folders, as the reference's layout) is evaluated on
    when given. Otherwise a labeled ``train`` is its own kNN bank beside ``data_dir/test``, as the
    reference does, and an unlabeled one leaves nothing to evaluate on. Raises DatasetError for an
    evaluation folder without labels or whose two splits' classes differ.
    """
    if eval_data_dir is not None:
        try:
            bank, test = scan_split(eval_data_dir, "train"), scan_split(eval_data_dir, "test")
            check_same_classes(bank, test)
        except DatasetError as exc:
            raise DatasetError(f"--eval_data_dir needs labeled images (train/ and test/, one sub-folder per class): "
                               f"{exc}") from None
        return Evaluation(os.path.abspath(eval_data_dir), bank, test)
    if not train.labeled:
        return Evaluation(None, skipped=f"{os.path.abspath(train.root)} holds unlabeled images and no "
                                        f"--eval_data_dir was given")
    test = scan_split(data_dir, "test")
    check_same_classes(train, test)
    return Evaluation(os.path.abspath(data_dir), train, test)
