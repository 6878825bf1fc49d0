"""Linear probes: the cached one learns separable features; the main_lincls protocol runs end to end; BYOL's
end-of-run linear evaluation reads the eval section and averages as the reference does."""
import pytest
import torch
import torch.nn.functional as F

from lcr_fast.data import scan_split
from lcr_fast.eval import linear_eval_lcr, linear_probe_cached, linear_probe_reference
from lcr_fast.models import build_model

from helpers import tiny_config, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_classes(
    classes: int, per_class: int, dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = centers[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator)
    # L2-normalised, as model.extract returns them and as lr=30 expects.
    return F.normalize(feats, dim=1), labels


def test_cached_probe_separates_gaussian_classes() -> None:
    generator = torch.Generator().manual_seed(1)
    train_feats, train_labels = gaussian_classes(10, 100, 32, generator)
    test_feats, test_labels = gaussian_classes(10, 50, 32, generator)
    result = linear_probe_cached(train_feats, train_labels, test_feats, test_labels, num_classes=10)
    # Percent, as main_lincls reports; chance is 10 %.
    assert result["top1"] > 90.0
    assert result["top1"] <= result["top5"] <= 100.0
    assert linear_probe_cached(train_feats, train_labels, test_feats, test_labels, num_classes=10) == result


def test_reference_protocol_runs_end_to_end() -> None:
    generator = torch.Generator().manual_seed(2)
    classes, dim = 4, 8
    frozen = torch.nn.Conv2d(3, dim, kernel_size=4).eval()
    weights_before = frozen.weight.clone()
    calls = []

    def extract(images: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        calls.append(len(images))
        return F.normalize(frozen(images).flatten(1), dim=1)

    def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Each class has its own image pattern, perturbed per sample like an augmentation would.
        patterns = torch.randn(classes, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        out = []
        for _ in range(count):
            labels = torch.randint(classes, (16,), generator=generator)
            out.append((patterns[labels] + 0.3 * torch.randn(16, 3, 4, 4, generator=generator), labels))
        return out

    train_loader, test_loader = batches(12), batches(3)
    result = linear_probe_reference(
        extract, train_loader, test_loader, classes, dim, epochs=2, milestones=(1,), device="cpu", progress=False
    )
    assert calls == [16] * (2 * 12 + 3)  # every training batch is re-extracted each epoch
    assert torch.equal(frozen.weight, weights_before)
    assert set(result) == {"top1", "top5"}
    # Chance is 25 %; with four classes every label is in the top 5.
    assert 50.0 < result["top1"] <= 100.0
    assert result["top5"] == 100.0


def test_lcr_linear_eval_reads_the_eval_section_and_extracts_every_iteration(tmp_path) -> None:
    root = write_folder(tmp_path, classes=3, per_class=4, size=40)
    train, test = scan_split(root, "train"), scan_split(root, "test")
    cfg = tiny_config(eval={"num_epochs": 2, "batch_size": 5, "base_lr": 12.8, "optimizer": {"momentum": 0.5}})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls, extract = [], model.extract

    def counted(images: torch.Tensor) -> dict:
        assert not torch.is_grad_enabled() and not model.training
        calls.append(len(images))
        return extract(images)

    model.extract = counted
    result = linear_eval_lcr(model, train, test, cfg, "cpu")
    # 12 training images in batches of 5, extracted afresh at each of 2 x 3 iterations; then the 12 test images.
    assert calls == [5, 5, 2] * 2 + [5, 5, 2]
    assert (result["epochs"], result["steps_per_epoch"], result["steps"], result["batch_size"]) == (2, 3, 6, 5)
    assert result["lr"] == pytest.approx(12.8 * 5 / 256) and result["momentum"] == 0.5
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # The reference's AverageMeter: each batch's accuracy counts alike, the last batch of 2 as much as those of 5.
    batches = result["test_batches"]
    assert [n for _, n in batches] == [5, 5, 2]
    assert result["top1"] == result["top1_batch_mean"] == pytest.approx(100 * sum(c / n for c, n in batches) / 3)
    assert result["top1_sample_weighted"] == pytest.approx(100 * sum(c for c, _ in batches) / 12)
    assert "per-batch" in result["accuracy"]

    weighted = linear_eval_lcr(model, train, test, tiny_config(eval=dict(cfg.eval),
                                                               fixes={"linear_eval_weighted_accuracy": True}), "cpu")
    assert weighted["test_batches"] == batches, "the same seed trains the same classifier"
    assert weighted["top1"] == weighted["top1_sample_weighted"] == result["top1_sample_weighted"]
