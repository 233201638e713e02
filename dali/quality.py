"""Sample quality measured the way FID is (Heusel et al. 2017), in a feature space built here.

FID needs Inception-v3 weights, which cannot be downloaded in an offline setting. So we train a
small classifier on the real training images (digits or MNIST, which have labels), take its
penultimate-layer activations as features, and report

- the Fréchet distance between Gaussians fitted to the features of generated and real images,
  d² = ‖μ₁ - μ₂‖² + Tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^{1/2}),
- the floor: the same distance between two disjoint real samples of the same size (the estimator is
  biased upwards for finite samples, so "close to the floor" is the meaningful target),
- the classifier's label distribution over the samples (are all classes produced?), the fraction
  it classifies with confidence ≥ 0.9 (a sample a person reads as a digit), and, for samples of
  requested classes, the fraction classified as the class asked for.

`evaluate_samples` takes any feature extractor (a callable images -> (N, D) features), so true FID
is `evaluate_samples(samples, real, inception_pool3_features)` for a user who has the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIDENT = 0.9  # a sample counts as readable when the classifier gives one class this much


# -- the Fréchet distance -------------------------------------------------------------------------
def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a (N, D) feature matrix, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² between N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982).

    Tr((Σ₁Σ₂)^{1/2}) is computed as Tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}): the two matrices are similar,
    and the second is symmetric PSD, so its square root is real and stable (no complex sqrtm)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = (
        np.atleast_2d(sigma1).astype(np.float64),
        np.atleast_2d(sigma2).astype(np.float64),
    )
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_of_features(a, b) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


# -- a feature extractor trained here -------------------------------------------------------------
class Classifier(nn.Module):
    """A small CNN: three 3×3 convolutions (the last two strided; a third strided one for images of
    16 pixels or more, so that the pooled features see whole digits: 91.5% held-out accuracy on
    MNIST without it, 97.3% with it), global average pooling, a 128-wide hidden layer (the
    features) and the class logits. Works at any resolution ≥ 8."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        features: int = 128,
        image_size: int = 8,
    ):
        super().__init__()
        layers = [
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        ]
        if image_size >= 16:
            layers += [nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.hidden = nn.Linear(2 * width, features)
        self.head = nn.Linear(features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate layer: what the Fréchet distance is computed on."""
        return F.relu(self.hidden(self.conv(x).mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: Tensor,
    labels: Tensor,
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
    holdout: float = 0.1,
) -> tuple[Classifier, float]:
    """Train a `Classifier` on real labelled images; returns it (in eval mode) and its accuracy on
    a held-out tenth of the images (a check that the features mean something)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    n_test = max(1, int(len(images) * holdout))
    test, train = order[:n_test], order[n_test:]
    num_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(images.size(1), num_classes, image_size=images.size(-1)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        idx = train[torch.randint(len(train), (batch_size,), generator=g)]
        x, y = images[idx].to(device), labels[idx].to(device)
        # Small random shifts make the features robust to what a generator gets slightly wrong.
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = batched(model, images[test], device).argmax(1)
    accuracy = float((predictions == labels[test]).float().mean())
    return model, accuracy


@torch.no_grad()
def batched(
    fn: Callable[[Tensor], Tensor], images: Tensor, device="cpu", batch_size: int = 500
) -> Tensor:
    """Apply `fn` to `images` in batches on `device`; results on the CPU."""
    return torch.cat(
        [fn(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    )


# -- the report ------------------------------------------------------------------------------------
@dataclass
class QualityReport:
    distance: float
    """Fréchet distance, generated vs real features."""
    floor: float
    """Fréchet distance between two disjoint real samples of the same size."""
    n: int
    """Images per side in both distances."""
    label_counts: list[int] | None = None
    """How many generated samples the classifier assigns to each class."""
    classifier_accuracy: float | None = None
    """Held-out accuracy of the classifier whose features are used."""
    confident: float | None = None
    """Fraction of samples the classifier assigns to one class with probability ≥ 0.9."""
    real_confident: float | None = None
    """The same fraction for the n real images of the distance: what `confident` compares with."""
    requested_accuracy: float | None = None
    """Fraction of samples classified as the class they were generated for (conditional models)."""

    @property
    def ratio(self) -> float:
        return self.distance / self.floor if self.floor > 0 else float("inf")

    @property
    def classes_present(self) -> int | None:
        """How many classes the classifier finds among the samples at least once."""
        return None if self.label_counts is None else sum(c > 0 for c in self.label_counts)

    def lines(self) -> list[str]:
        out = [
            f"Fréchet distance (classifier features), {self.n} generated vs {self.n} real: "
            f"{self.distance:.3f}",
            f"real-vs-real floor ({self.n} vs {self.n} disjoint real images): {self.floor:.3f}",
            f"ratio to floor: {self.ratio:.2f}",
        ]
        if self.label_counts is not None:
            out.append(
                f"classes among samples ({self.classes_present}/{len(self.label_counts)} present): "
                + " ".join(f"{k}:{c}" for k, c in enumerate(self.label_counts))
            )
        if self.confident is not None:
            real = "" if self.real_confident is None else f" (real: {self.real_confident:.1%})"
            out.append(
                f"samples classified with confidence ≥ {CONFIDENT}: {self.confident:.1%}{real}"
            )
        if self.requested_accuracy is not None:
            out.append(f"samples classified as the requested class: {self.requested_accuracy:.1%}")
        if self.classifier_accuracy is not None:
            out.append(f"feature classifier held-out accuracy: {self.classifier_accuracy:.3f}")
        return out

    def to_dict(self) -> dict:
        return {
            "frechet_distance": self.distance,
            "floor": self.floor,
            "ratio": self.ratio,
            "n": self.n,
            "label_counts": self.label_counts,
            "classes_present": self.classes_present,
            "classifier_accuracy": self.classifier_accuracy,
            "confident": self.confident,
            "real_confident": self.real_confident,
            "requested_accuracy": self.requested_accuracy,
        }


def _confident_share(probs: Tensor) -> float:
    """Fraction of rows whose most probable class has probability ≥ CONFIDENT."""
    return float((probs.max(1).values >= CONFIDENT).float().mean())


def evaluate_samples(
    samples: Tensor,
    real: Tensor,
    features: Callable[[Tensor], Tensor],
    classify: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    device="cpu",
    requested: Tensor | None = None,
) -> QualityReport:
    """Distance of `samples` to `real` in the space of `features`, and the real-vs-real floor.

    Both distances use n = min(len(samples), len(real) // 2) images per side: the real images are
    shuffled with `seed` and split into two disjoint halves A and B; the distance is samples vs A,
    the floor A vs B. `classify` (images -> logits), if given, gives the label distribution over all
    samples, the fraction classified with confidence ≥ 0.9 (and the same fraction for A, the
    real images' share) and, with `requested` (the class each sample was generated for), the
    fraction classified as that class."""
    n = min(len(samples), len(real) // 2)
    if n < 2:
        raise ValueError(
            f"need at least 2 samples and 4 real images, got {len(samples)} and {len(real)}"
        )
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    real_a, real_b = real[order[:n]], real[order[n : 2 * n]]
    f_gen = batched(features, samples[:n], device).double().numpy()
    f_a = batched(features, real_a, device).double().numpy()
    f_b = batched(features, real_b, device).double().numpy()
    report = QualityReport(
        frechet_distance_of_features(f_gen, f_a), frechet_distance_of_features(f_a, f_b), n
    )
    if classify is not None:
        probs = batched(classify, samples, device).float().softmax(1)
        report.label_counts = torch.bincount(probs.argmax(1), minlength=probs.size(1)).tolist()
        report.confident = _confident_share(probs)
        report.real_confident = _confident_share(
            batched(classify, real_a, device).float().softmax(1)
        )
        if requested is not None:
            report.requested_accuracy = float((probs.argmax(1) == requested.cpu()).float().mean())
    return report
