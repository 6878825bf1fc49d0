"""Linear probes on a frozen model: a Linear(D, classes) trained with SGD, LR x0.1 at each milestone.

``linear_probe_reference`` is the protocol of GANPerf/LCR ``main_lincls.py``: features are taken
afresh from augmented images every epoch. ``linear_probe_cached`` trains on features extracted
once (no augmentation): seconds instead of hours, but without augmentation its numbers are not the
reference protocol's. Accuracies are in percent, as ``main_lincls.py`` prints them.
"""
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm


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
    milestones: Sequence[int] = (60, 80),
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
    milestones: Sequence[int] = (60, 80),
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
