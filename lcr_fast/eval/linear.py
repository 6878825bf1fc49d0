"""Linear probes on a frozen model: a Linear(D, classes) trained with SGD.

``linear_eval_lcr`` is the linear evaluation the reference's BYOL ``main.py`` runs after training
(``linear_cub_eval.py``): per-iteration warmup + cosine from the config's ``eval`` section, features
re-extracted from augmented images at every iteration. ``linear_probe_reference`` is MoCo's
``main_lincls.py`` (LR x0.1 at each milestone, features taken afresh every epoch).
``linear_probe_cached`` trains on features extracted once (no augmentation): seconds instead of
hours, but without augmentation its numbers are neither reference protocol's. Accuracies are in
percent, as the reference prints them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lcr_fast.data.folder import FolderIndex
from lcr_fast.data.torch_loader import FolderDataset, TorchEvalLoader
from lcr_fast.data.transforms import linear_train_transform
from lcr_fast.eval.numerics import EvalNumerics
from lcr_fast.optim import WarmupCosineSchedule

# main_lincls.py's epochs at which the LR drops x0.1, set for its 100 epochs; kept whatever eval.num_epochs says.
LINCLS_MILESTONES = (60, 80)


def _classifier(dim: int, num_classes: int, seed: int, device: torch.device) -> nn.Linear:
    # As the Classifier main_lincls trains (the reference's classifier.py): weights N(0, 0.01), zero bias.
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(dim, num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=generator)
        classifier.bias.zero_()
    return classifier.to(device)


def _set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, lr: float, milestones: Sequence[int]) -> float:
    epoch_lr = lr * 0.1 ** sum(epoch >= m for m in milestones)
    for group in optimizer.param_groups:
        group["lr"] = epoch_lr
    return epoch_lr


def _sgd_step(classifier: nn.Linear, optimizer: torch.optim.Optimizer, feats: Tensor, labels: Tensor) -> Tensor:
    loss = F.cross_entropy(classifier(feats), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def _accuracy(classifier: nn.Linear, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    device = classifier.weight.device
    correct = torch.zeros(2, dtype=torch.long, device=device)
    total = 0
    for feats, labels in batches:
        labels = labels.to(device)
        logits = classifier(feats.to(device, torch.float32))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
        total += labels.shape[0]
    top1, top5 = (correct.double() / total * 100).tolist()
    return {"top1": top1, "top5": top5}


def linear_probe_cached(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = LINCLS_MILESTONES,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1/top-5 test accuracy (percent) of a linear classifier trained on fixed features.

    Runs on the device of ``train_feats``; ``seed`` fixes the initialisation and the batch order.
    """
    device = train_feats.device
    train_feats = train_feats.detach().float()
    train_labels = train_labels.to(device, torch.long)
    classifier = _classifier(train_feats.shape[1], num_classes, seed, device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        _set_epoch_lr(optimizer, epoch, lr, milestones)
        for batch in torch.randperm(train_feats.shape[0], generator=generator).to(device).split(batch_size):
            _sgd_step(classifier, optimizer, train_feats[batch], train_labels[batch])
    return _accuracy(classifier, [(test_feats, test_labels)])


def linear_probe_reference(
    extract: Callable[[Tensor], Tensor],
    train_loader: Iterable[tuple[Tensor, Tensor]],
    test_loader: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    feature_dim: int,
    epochs: int = 100,
    lr: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = LINCLS_MILESTONES,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """The main_lincls protocol: top-1/top-5 test accuracy (percent) after the last epoch.

    ``extract`` maps a batch of images to features [B, feature_dim] and must leave the model
    frozen (eval mode, as main_lincls keeps it so that BatchNorm statistics do not move); it runs
    under ``no_grad``. The caller's loaders supply the augmentation (main_lincls: RandomResizedCrop
    224 + flip for training, Resize 256 + CenterCrop 224 for testing) and the shuffling. ``device``
    defaults to CUDA when available; ``seed`` fixes the classifier's initialisation.
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    classifier = _classifier(feature_dim, num_classes, seed, device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr, momentum=momentum, weight_decay=weight_decay)

    def features(images: Tensor) -> Tensor:
        with torch.no_grad():
            return extract(images.to(device, non_blocking=True)).float()

    bar = tqdm(range(epochs), desc="linear probe", disable=not progress)
    for epoch in bar:
        epoch_lr = _set_epoch_lr(optimizer, epoch, lr, milestones)
        # Summed on the device and read once per epoch, so the steps never wait on the host.
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for images, labels in train_loader:
            labels = labels.to(device, torch.long, non_blocking=True)
            loss_sum += _sgd_step(classifier, optimizer, features(images), labels) * labels.shape[0]
            seen += labels.shape[0]
        bar.set_postfix(loss=float(loss_sum) / max(seen, 1), lr=epoch_lr)
    return _accuracy(classifier, ((features(images), labels) for images, labels in test_loader))


def _mean_of_batches(correct: list[int], sizes: list[int]) -> float:
    """The reference's AverageMeter fed ``correct / batch`` with weight 1: every batch counts alike,
    so the last, smaller batch weighs as much as a full one."""
    total = 0.0
    for c, n in zip(correct, sizes):
        total += c / n
    return total / len(sizes)


def linear_eval_lcr(model: nn.Module, train_index: FolderIndex, test_index: FolderIndex, cfg,
                    device: torch.device | str, key: str = "rationale", numerics: EvalNumerics | None = None,
                    progress: bool = False) -> dict:
    """BYOL's end-of-run linear evaluation as the reference runs it (``main.py`` ->
    ``linear_cub_eval.py``, or ``linear_stanfordcars_eval.py``: the same but for the class count),
    with the settings of ``cfg.eval``.

    At every iteration ``model`` (eval mode, no grad) extracts ``key`` features of a shuffled batch of
    ``eval.batch_size`` training images (RandomResizedCrop + flip), and a Linear(D, classes) with
    PyTorch's default initialisation takes an SGD step on them at the rate of the eval section's
    warmup + cosine schedule (un-warmed first iteration unless ``fixes.warmup_first_step``). The test
    images (Resize + CenterCrop) are classified once at the end. ``cfg.seed`` fixes the
    initialisation, the batch order and the augmentation; ``cfg.dataset`` gives the crop size and the
    loader workers. ``top1`` is averaged as ``fixes.linear_eval_weighted_accuracy`` says (the
    reference: the mean of per-batch accuracies); both averagings are returned as well, and each test
    batch's (correct, size).
    """
    ev, device = cfg.eval, torch.device(device)
    numerics = numerics or EvalNumerics()
    seed = cfg.seed or 0
    size, workers = cfg.dataset.image_size, cfg.dataset.num_workers
    train_loader = DataLoader(FolderDataset(train_index, linear_train_transform(size)), batch_size=ev.batch_size,
                              shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)
    test_loader = TorchEvalLoader(test_index, batch_size=ev.batch_size, image_size=size, device=device,
                                  num_workers=workers)
    schedule = WarmupCosineSchedule(cfg, len(train_loader), section="eval")

    def features(images: Tensor) -> Tensor:
        with torch.no_grad():
            return numerics.extract(model, images.to(device, non_blocking=True))[key].float()

    was_training = model.training
    model.eval()
    # The transforms draw from torch's global RNG in this process (workers: from the generator's seeds).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(model.backbone.output_dim, len(test_index.classes)).to(device)
        step, last_loss = _train_classifier(classifier, features, train_loader, schedule, ev, device, progress)
        with torch.no_grad():
            scored = [((classifier(features(images)).argmax(dim=1) == labels.to(device)).sum(), labels.shape[0])
                      for images, labels in test_loader]
    model.train(was_training)
    correct, sizes = torch.stack([c for c, _ in scored]).tolist(), [n for _, n in scored]
    batch_mean, weighted = 100 * _mean_of_batches(correct, sizes), 100 * sum(correct) / sum(sizes)
    by_images = cfg.fixes.linear_eval_weighted_accuracy
    return {
        "protocol": "lcr", "top1": weighted if by_images else batch_mean, "top1_batch_mean": batch_mean,
        "top1_sample_weighted": weighted,
        "accuracy": ("over all test images (fixes.linear_eval_weighted_accuracy)" if by_images else
                     "mean of per-batch accuracies (the reference's)"),
        "epochs": ev.num_epochs, "steps": step, "steps_per_epoch": len(train_loader), "batch_size": ev.batch_size,
        "optimizer": ev.optimizer.name, "lr": schedule.base_lr, "base_lr": ev.base_lr,
        "warmup_epochs": ev.warmup_epochs, "warmup_lr": ev.warmup_lr, "final_lr": ev.final_lr,
        "momentum": ev.optimizer.momentum, "weight_decay": ev.optimizer.weight_decay,
        "first_step_warmed": cfg.fixes.warmup_first_step,
        "features": key, "seed": seed, "num_train": len(train_index), "num_test": len(test_index),
        "last_epoch_loss": last_loss, "test_batches": [[c, n] for c, n in zip(correct, sizes)],  # (correct, size)
        "augmentation": "RandomResizedCrop (bicubic, scale 0.08-1) + flip (train), Resize + CenterCrop (test)",
    }


def _train_classifier(classifier: nn.Linear, features: Callable[[Tensor], Tensor], train_loader, schedule, ev,
                      device: torch.device, progress: bool) -> tuple[int, float]:
    """SGD on fresh features of every batch, at the schedule's rate per iteration; returns (steps taken,
    the last epoch's mean loss)."""
    optimizer = torch.optim.SGD(classifier.parameters(), lr=schedule.base_lr, momentum=ev.optimizer.momentum,
                                weight_decay=ev.optimizer.weight_decay)
    step, last_loss = 0, float("nan")
    bar = tqdm(range(ev.num_epochs), desc="linear evaluation", disable=not progress)
    for _ in bar:
        # Summed on the device and read once per epoch, so the steps never wait on the host.
        loss_sum, seen = torch.zeros((), device=device), 0
        for images, labels in train_loader:
            schedule.apply(optimizer, step)
            labels = labels.to(device, torch.long, non_blocking=True)
            loss_sum += _sgd_step(classifier, optimizer, features(images), labels) * labels.shape[0]
            seen, step = seen + labels.shape[0], step + 1
        last_loss = float(loss_sum) / seen
        bar.set_postfix(loss=last_loss)
    return step, last_loss
