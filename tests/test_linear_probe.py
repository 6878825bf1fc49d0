"""Linear probes: the cached one learns separable features; the main_lincls protocol runs end to end."""
import torch
import torch.nn.functional as F

from lcr_fast.eval import linear_probe_cached, linear_probe_reference


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
