"""FD-digits and classifier accuracy of generated digits: the evaluation of the embedded default.

FD-digits is FID with the Inception net replaced by the project's digits classifier (digits_net.py):
the Fréchet distance between Gaussian fits of the classifier's penultimate features of the generated
images and of a reference split. Accuracy is the classifier's agreement with the class labels that
conditioned class-conditional samples.

Reference split: 'train' by default. It has the most images (1,497), so the reference statistics
carry the least sampling noise, and it is the distribution the generators are trained on. (The
classifier also saw it; held-out real images therefore score a small non-zero FD: about the floor
a perfect generator can reach.)

FD is biased upwards at small sample counts (the estimated covariance of N samples is noisy, and the
noise adds to the distance), and the bias depends on N. Compare FD values only between runs with the
same number of samples, the same sampling seeds and the same evaluator config.
"""
from __future__ import annotations

import numpy as np

from lcm_jax.data import digits
from lcm_jax.eval import digits_net, fid


class DigitsEvaluator:
    """FD-digits and accuracy for images [N, S, S, C] in [-1, 1] (clip samples before evaluating)."""

    def __init__(self, image_size: int = 16, channels: int = 1, cache_dir: str | None = None,
                 reference_split: str = "train"):
        self.net = digits_net.load_or_train(image_size, channels, cache_dir)
        self.reference_split = reference_split
        reference_images, _ = digits.load(reference_split, image_size, channels)
        self.reference_count = reference_images.shape[0]
        self.reference_mu, self.reference_sigma = fid.gaussian_stats(self.net.features(reference_images))

    def fd(self, images) -> float:
        """FD-digits of images against the reference statistics; needs >= 2 images."""
        return self._fd_of_features(self.net.features(images))

    def accuracy(self, images, labels) -> float:
        """Fraction of images the classifier assigns to their conditioning label."""
        return self._accuracy_of_logits(self.net.logits(images), labels)

    def evaluate(self, images, labels=None) -> dict[str, float]:
        """{'fd': ..., 'acc': ...} from one forward pass ('acc' only when labels are given)."""
        features, logits = self.net.features_and_logits(images)
        metrics = {"fd": self._fd_of_features(features)}
        if labels is not None:
            metrics["acc"] = self._accuracy_of_logits(logits, labels)
        return metrics

    def _fd_of_features(self, features) -> float:
        mu, sigma = fid.gaussian_stats(features)
        return fid.frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)

    @staticmethod
    def _accuracy_of_logits(logits, labels) -> float:
        labels = np.asarray(labels)
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"accuracy expects labels [N] for {logits.shape[0]} images, got shape {labels.shape}.")
        return float(np.mean(np.argmax(logits, axis=-1) == labels))
