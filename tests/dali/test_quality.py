"""The Fréchet distance against closed forms and scipy, and the quality report."""

import numpy as np
import pytest
import torch

from dali.quality import (
    evaluate_samples,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
)


def test_frechet_distance_of_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-12)


def test_frechet_distance_of_commuting_gaussians_closed_form():
    """Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ share eigenvectors: Tr(...) = Σ(√a - √b)²."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
    a, b = np.array([1.0, 2, 3, 4, 5]), np.array([0.5, 2, 8, 1, 5])
    d = frechet_distance(np.zeros(5), q @ np.diag(a) @ q.T, np.ones(5), q @ np.diag(b) @ q.T)
    assert d == pytest.approx(5 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_frechet_distance_matches_scipy_sqrtm_formula():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    for dim in (2, 16, 64):
        a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        covmean = linalg.sqrtm(s1 @ s2).real
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_statistics_and_evaluate_samples_with_any_feature_extractor():
    torch.manual_seed(0)
    real = torch.randn(400, 1, 2, 2)
    mu, sigma = feature_statistics(real.flatten(1).numpy())
    np.testing.assert_allclose(sigma, np.cov(real.flatten(1).numpy().T))
    flatten = lambda x: x.flatten(1)
    good = evaluate_samples(torch.randn(300, 1, 2, 2), real, flatten)
    bad = evaluate_samples(torch.randn(300, 1, 2, 2) * 2 + 1, real, flatten)
    assert good.n == 200 and bad.n == 200  # min(samples, half the real images)
    assert good.floor == bad.floor
    assert good.distance < 3 * good.floor < bad.distance
    classify = lambda x: torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)
    report = evaluate_samples(real[:10], real, flatten, classify)
    assert sum(report.label_counts) == 10 and len(report.label_counts) == 2
    assert frechet_distance_of_features(real.flatten(1), real.flatten(1)) == pytest.approx(
        0, abs=1e-9
    )


def test_confidence_and_requested_class_fractions_by_hand():
    """Four samples with known class probabilities: which count as confident (≥ 0.9) and which
    were classified as the class requested for them."""
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.02, 0.98], [0.5, 0.5]])
    samples = torch.arange(4.0).view(4, 1, 1, 1)  # the sample is its row number
    classify = lambda x: probs[x.flatten().long()].log()  # logits whose softmax is `probs`
    real = torch.randn(8, 1, 1, 1)
    report = evaluate_samples(samples, real, lambda x: x.flatten(1), classify,
                              requested=torch.tensor([1, 1, 1, 1]))  # fmt: skip
    assert report.label_counts == [3, 1]  # argmax of the tie [0.5, 0.5] is class 0
    assert report.confident == pytest.approx(2 / 4)
    assert report.requested_accuracy == pytest.approx(1 / 4)  # only the third matches
    assert "confidence ≥ 0.9: 50.0%" in "\n".join(report.lines())


def test_the_real_images_confidence_is_measured_on_the_real_images():
    """The confident share of the real comparison images is reported beside the samples': real
    images all of the sure kind (row 0, p 0.95) give 100%, all of the unsure kind (row 1) 0%,
    while the same four samples stay at 50%."""
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.02, 0.98], [0.5, 0.5]])
    samples = torch.arange(4.0).view(4, 1, 1, 1)
    classify = lambda x: probs[x.flatten().long()].log()
    for row, expected in ((0, 1.0), (1, 0.0)):
        real = torch.full((8, 1, 1, 1), float(row))
        report = evaluate_samples(samples, real, lambda x: x.flatten(1), classify)
        assert report.confident == pytest.approx(0.5)
        assert report.real_confident == pytest.approx(expected)
        assert report.to_dict()["real_confident"] == pytest.approx(expected)
        assert f"50.0% (real: {expected:.1%})" in "\n".join(report.lines())


def test_classes_present_counts_only_the_classes_some_sample_is_assigned():
    """Three classes, samples assigned to classes 0 and 2 only: two present, class 1 missing."""
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    samples = torch.arange(3.0).view(3, 1, 1, 1)
    classify = lambda x: probs[x.flatten().long()].log()
    report = evaluate_samples(samples, torch.randn(6, 1, 1, 1), lambda x: x.flatten(1), classify)
    assert report.label_counts == [2, 0, 1]
    assert report.classes_present == 2 and report.to_dict()["classes_present"] == 2
    assert "(2/3 present)" in "\n".join(report.lines())
