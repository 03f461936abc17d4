"""What `train.py` trains on: toy data with a known density, or images; each with its network and metrics.

A `Task` bundles everything data-specific, so `train.py` is the same loop for both: a pure-JAX batch
sampler `draw(key, n) -> (x, labels or None)`, the network family, the schedule (shifted with the
image resolution, Sec. 3.3), the closed-form denoiser when there is one, and the metrics.
"""

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import data as D
import metrics as M
from models import MLPDenoiser
from uvit import ImageDenoiser
from sampling import Schedule

CLASSIFIER_CACHE = "runs/digits_classifier.eqx"  # the digits classifier of the image metrics, trained once


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    name: str
    shape: tuple  # one example, e.g. (2,) or (8, 8, 1)
    num_classes: int  # 0: unconditional; else labels in [0, num_classes), num_classes = the null class
    schedule: Schedule
    draw: Callable  # (key, n) -> (x (n, *shape), labels (n,) or None); pure JAX, usable under jit
    network: Callable  # key -> a fresh denoiser network
    feat_dim: int  # channels of network.features (DMD2's discriminator head reads them)
    evaluate: Callable  # (samples, labels, key) -> {metric: value}
    floor: Callable  # key -> the same metrics for real data (the noise floor)
    primary: str  # the metric the claims compare (lower is better)
    exact: Optional[object] = None  # closed-form denoiser, toys only
    toy: Optional[D.ToyData] = None


def toy_task(cfg) -> Task:
    schedule = Schedule()
    toy = D.get_toy(cfg.data, cfg.dim, seed=cfg.seed, schedule=schedule)
    sigma_data = float(np.sqrt(np.mean(np.diag(toy.cov()))))  # EDM preconditioning at the data's scale

    def network(key):
        return MLPDenoiser(toy.dim, width=cfg.width, depth=cfg.depth, sigma_data=sigma_data, schedule=schedule, key=key)

    return Task(
        name=toy.name, shape=(toy.dim,), num_classes=0, schedule=schedule,
        draw=lambda key, n: (toy.denoiser.sample(key, n), None),
        network=network, feat_dim=cfg.width,
        evaluate=lambda x, labels, key: M.evaluate(x, toy, key, cfg.n_samples),
        floor=lambda key: M.evaluate_floor(toy, key, cfg.n_samples, cfg.n_samples),
        primary="mmd2", exact=toy.denoiser, toy=toy,
    )


def image_task(cfg) -> Task:
    """Images from `data.get_images` ("digits" or "npz:PATH"), class-conditional when labels exist.

    Metrics: with 8x8x1 images (digits), the Frechet distance in the features of a small digits
    classifier (trained deterministically, cached beside the run) and its accuracy on class-conditional
    samples, against a random half of the data (the other half gives the real-vs-real floor). Other
    shapes: the Frechet distance in pixel space against the data.
    """
    images, labels = D.get_images(cfg.data)
    if cfg.guidance and labels is None:  # guidance contrasts the conditional and the unconditional prediction
        raise ValueError(f"--guidance {cfg.guidance} needs labels; {cfg.data} has none")
    n_img, size, _, channels = images.shape
    num_classes = 0 if labels is None else int(labels.max()) + 1
    schedule = Schedule.for_resolution(size)
    images_j = jnp.asarray(images)
    labels_j = None if labels is None else jnp.asarray(labels, jnp.int32)

    def draw(key, n):
        idx = jr.randint(key, (n,), 0, n_img)
        return images_j[idx], None if labels_j is None else labels_j[idx]

    def network(key):
        return ImageDenoiser(size, channels, num_classes=num_classes, width=cfg.width, depth=cfg.depth,
                             schedule=schedule, key=key)

    if images.shape[1:] == (8, 8, 1) and num_classes == 10:
        classifier = M.load_or_train_classifier(CLASSIFIER_CACHE, seed=0)
        ref = D.digits_halves(0)[1][0] if cfg.data == "digits" else images  # the reference half (digits)

        def evaluate(x, lab, key):
            return M.image_metrics(x, lab, classifier, ref)

        def floor(key):
            return M.image_floor(classifier) if cfg.data == "digits" else {}
    else:
        flat = images.reshape(n_img, -1)

        def evaluate(x, lab, key):
            return {"fd": M.frechet_distance(np.clip(x, -1, 1).reshape(len(x), -1), flat)}

        def floor(key):
            perm = np.random.default_rng(0).permutation(n_img)
            return {"fd": M.frechet_distance(flat[perm[: n_img // 2]], flat[perm[n_img // 2:]])}

    return Task(name=cfg.data, shape=tuple(images.shape[1:]), num_classes=num_classes, schedule=schedule, draw=draw,
                network=network, feat_dim=cfg.width, evaluate=evaluate, floor=floor, primary="fd")


def is_image_data(name: str) -> bool:
    return name == "digits" or name.startswith("npz:")


def make_task(cfg) -> Task:
    return image_task(cfg) if is_image_data(cfg.data) else toy_task(cfg)
