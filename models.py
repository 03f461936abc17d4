"""Denoisers: exact ones for Gaussian data (the test oracles and exact teachers), the toy MLP and the DMD2
discriminator head (the image network, a UViT, is `uvit.py`).

Every denoiser follows the Equinox convention: `denoiser(z, t) -> x_hat` maps one unbatched example
`z` and a scalar VP time `t` to a prediction of the clean data; callers `vmap` it.
"""

import math

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
import numpy as np

from sampling import Schedule, posterior


# ----------------------------------------------------------------------------------------------
# Exact denoisers E[x | z_t] of Gaussian data and Gaussian mixtures (closed forms: the tests' oracles).


def _check_covs(covs, dim):
    covs = np.asarray(covs, np.float64)
    if covs.shape[-2:] != (dim, dim):
        raise ValueError(f"covariance must have shape (..., {dim}, {dim}) to match the mean; got {covs.shape}")
    if not np.allclose(covs, np.swapaxes(covs, -1, -2), atol=1e-6):
        raise ValueError("covariance must be symmetric")
    eig = np.linalg.eigvalsh(covs)
    if np.any(eig <= 0):
        raise ValueError(f"covariance must be positive definite; smallest eigenvalue {eig.min():.3g} <= 0")


def _gaussian_posterior(mean, cov, z, alpha, sigma):
    """E[x | z] and log N(z; alpha mean, alpha^2 cov + sigma^2 I) for x ~ N(mean, cov), z = alpha x + sigma eps."""
    d = mean.shape[-1]
    c = alpha**2 * cov + sigma**2 * jnp.eye(d)
    chol = jnp.linalg.cholesky(c)
    r = z - alpha * mean
    sol = jsl.cho_solve((chol, True), r)  # c^-1 r
    x_mean = mean + alpha * cov @ sol
    logp = -0.5 * r @ sol - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * d * math.log(2 * math.pi)
    return x_mean, logp


class GaussianDenoiser(eqx.Module):
    """Exact `E[x | z_t]` for data x ~ N(mean, cov): `mean + alpha S (alpha^2 S + sigma^2 I)^-1 (z - alpha mean)`."""

    mean: jax.Array  # (D,)
    cov: jax.Array  # (D, D)
    schedule: Schedule = Schedule()

    def __init__(self, mean, cov, schedule: Schedule = Schedule()):
        mean = np.asarray(mean, np.float32)
        if mean.ndim != 1:
            raise ValueError(f"mean must be a vector (D,); got shape {mean.shape}")
        _check_covs(cov, mean.shape[0])
        self.mean, self.cov, self.schedule = jnp.asarray(mean), jnp.asarray(cov, jnp.float32), schedule

    def __call__(self, z, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        # theta = (mean, cov) is trained in the closed-form testbed: keep S symmetric, and solve without a
        # Cholesky factor, which a transiently indefinite S would turn into NaN
        cov = 0.5 * (self.cov + self.cov.T)
        c = alpha**2 * cov + sigma**2 * jnp.eye(self.mean.shape[0])
        return self.mean + alpha * cov @ jnp.linalg.solve(c, z - alpha * self.mean)

    def posterior_cov(self, t):
        """Cov[x | z_t] = S - alpha^2 S (alpha^2 S + sigma^2 I)^-1 S."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        c = alpha**2 * self.cov + sigma**2 * jnp.eye(self.mean.shape[0])
        return self.cov - alpha**2 * self.cov @ jnp.linalg.solve(c, self.cov)

    def sample(self, key, n):
        return jr.multivariate_normal(key, self.mean, self.cov, (n,))

    def log_prob(self, x):
        return _gaussian_posterior(self.mean, self.cov, x, 1.0, 0.0)[1]


class MixtureDenoiser(eqx.Module):
    """Exact `E[x | z_t] = sum_i r_i(z_t) E_i[x | z_t]` for a Gaussian mixture, responsibilities by log-sum-exp."""

    weights: jax.Array  # (K,)
    means: jax.Array  # (K, D)
    covs: jax.Array  # (K, D, D)
    schedule: Schedule = Schedule()

    def __init__(self, weights, means, covs, schedule: Schedule = Schedule()):
        weights, means = np.asarray(weights, np.float64), np.asarray(means, np.float32)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D); got {means.shape}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means; got {weights.shape}")
        if np.any(weights < 0) or abs(weights.sum() - 1.0) > 1e-5:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1; got sum {weights.sum():.6g}")
        covs = np.asarray(covs, np.float32)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}); got {covs.shape}")
        _check_covs(covs, d)
        self.weights, self.means, self.covs = jnp.asarray(weights, jnp.float32), jnp.asarray(means), jnp.asarray(covs)
        self.schedule = schedule

    def _components(self, z, alpha, sigma):
        post = jax.vmap(_gaussian_posterior, in_axes=(0, 0, None, None, None))
        x_means, logp = post(self.means, self.covs, z, alpha, sigma)  # (K, D), (K,)
        return x_means, jax.nn.log_softmax(jnp.log(self.weights) + logp)

    def responsibilities(self, z, t):
        """p(component i | z_t), shape (K,)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        return jnp.exp(self._components(z, alpha, sigma)[1])

    def __call__(self, z, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_means, log_r = self._components(z, alpha, sigma)
        return jnp.exp(log_r) @ x_means

    def sample(self, key, n):
        kc, kx = jr.split(key)
        comp = jr.choice(kc, self.weights.shape[0], (n,), p=self.weights)
        chol = jnp.linalg.cholesky(self.covs)[comp]  # (n, D, D)
        eps = jr.normal(kx, (n, self.means.shape[1]))
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol, eps)

    def log_prob(self, x):
        _, logp = jax.vmap(_gaussian_posterior, in_axes=(0, 0, None, None, None))(self.means, self.covs, x, 1.0, 0.0)
        return jax.nn.logsumexp(jnp.log(self.weights) + logp)


class AffineStepDenoiser(eqx.Module):
    """`x_hat = A_i z + b_i` with one affine map per step i of the k-step grid t_i = 1 - i/k (i = round((1 - t) k)).

    With Gaussian data every step of the exact sampler is affine, so this family contains a k-step sampler
    whose output is exactly the data distribution: the student of the closed-form testbed (`test_testbed.py`).
    """

    A: jax.Array  # (k, D, D)
    b: jax.Array  # (k, D)

    @classmethod
    def from_gaussian(cls, denoiser: GaussianDenoiser, k: int):
        """The exact denoiser at each grid time: `A_i = alpha S (alpha^2 S + sigma^2 I)^-1`, `b_i = mean - alpha A_i mean`."""
        t = 1.0 - jnp.arange(k) / k
        alpha, sigma = denoiser.schedule.alpha_sigma(t)
        d = denoiser.mean.shape[0]
        c = alpha[:, None, None] ** 2 * denoiser.cov + sigma[:, None, None] ** 2 * jnp.eye(d)
        a = alpha[:, None, None] * jnp.linalg.solve(c, jnp.broadcast_to(denoiser.cov, c.shape)).transpose(0, 2, 1)
        return cls(a, denoiser.mean - alpha[:, None] * (a @ denoiser.mean))

    def __call__(self, z, t):
        k = self.A.shape[0]
        i = jnp.clip(jnp.round((1.0 - t) * k).astype(jnp.int32), 0, k - 1)
        return self.A[i] @ z + self.b[i]

    def output_moments(self, schedule: Schedule):
        """Exact mean and covariance of the k-step ancestral sampler's output (`sampling.ancestral_sample`).

        z_1 ~ N(0, I); each step `z_s = c_z z_t + c_x (A_i z_t + b_i) + std eps` is affine with Gaussian noise.
        """
        k, d = self.b.shape
        m, p = jnp.zeros(d), jnp.eye(d)
        for i in range(k - 1):
            t, s = 1.0 - i / k, 1.0 - (i + 1) / k
            c_z = posterior(schedule, jnp.ones(()), jnp.zeros(()), t, s)[0]
            c_x, std = posterior(schedule, jnp.zeros(()), jnp.ones(()), t, s)
            step = c_z * jnp.eye(d) + c_x * self.A[i]
            m, p = step @ m + c_x * self.b[i], step @ p @ step.T + std**2 * jnp.eye(d)
        return self.A[-1] @ m + self.b[-1], self.A[-1] @ p @ self.A[-1].T


# ----------------------------------------------------------------------------------------------
# A small network denoiser for vector data, with EDM's preconditioning written for the VP process.


def edm_precond(schedule: Schedule, t, sigma_data):
    """EDM's (c_skip, c_out, c_in) in VP form: x_hat = c_skip z + c_out F(c_in z), d = sqrt(sigma^2 + alpha^2 sd^2)."""
    alpha, sigma = schedule.alpha_sigma(t)
    d = jnp.sqrt(sigma**2 + alpha**2 * sigma_data**2)
    return sigma_data**2 * alpha / d**2, sigma * sigma_data / d, 1.0 / d


def fourier_features(logsnr, dim):
    """Sinusoidal embedding of log-SNR with geometric frequencies (fixed, not trained)."""
    freqs = jnp.exp(jnp.linspace(math.log(1 / 16), math.log(4.0), dim // 2))
    angles = freqs * logsnr
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class ResBlock(eqx.Module):
    norm: eqx.nn.LayerNorm
    lin1: eqx.nn.Linear
    emb: eqx.nn.Linear
    lin2: eqx.nn.Linear

    def __init__(self, width, emb_dim, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.norm = eqx.nn.LayerNorm(width)
        self.lin1 = eqx.nn.Linear(width, width, key=k1)
        self.emb = eqx.nn.Linear(emb_dim, width, key=k2)
        self.lin2 = eqx.nn.Linear(width, width, key=k3)

    def __call__(self, h, emb):
        return h + self.lin2(jax.nn.silu(self.lin1(self.norm(h)) + self.emb(emb)))


class MLPDenoiser(eqx.Module):
    """Residual MLP x-predictor for vectors `(D,)`, conditioned on log-SNR, EDM-preconditioned.

    `features(z, t)` returns the last hidden layer `(width,)`, which DMD2's discriminator head reads.
    """

    embed: eqx.nn.MLP
    inp: eqx.nn.Linear
    blocks: list
    norm: eqx.nn.LayerNorm
    out: eqx.nn.Linear
    schedule: Schedule
    sigma_data: float = eqx.field(static=True)
    emb_dim: int = eqx.field(static=True)

    def __init__(self, dim, *, width=128, depth=3, emb_dim=32, sigma_data=0.5, schedule=Schedule(), key):
        ke, ki, kb, ko = jr.split(key, 4)
        self.embed = eqx.nn.MLP(emb_dim, emb_dim, emb_dim, depth=1, activation=jax.nn.silu, key=ke)
        self.inp = eqx.nn.Linear(dim, width, key=ki)
        self.blocks = [ResBlock(width, emb_dim, key=k) for k in jr.split(kb, depth)]
        self.norm = eqx.nn.LayerNorm(width)
        self.out = eqx.nn.Linear(width, dim, key=ko)
        self.schedule, self.sigma_data, self.emb_dim = schedule, sigma_data, emb_dim

    def features(self, z, t):
        _, _, c_in = edm_precond(self.schedule, t, self.sigma_data)
        emb = self.embed(fourier_features(self.schedule.logsnr(t), self.emb_dim))
        h = self.inp(c_in * z)
        for block in self.blocks:
            h = block(h, emb)
        return self.norm(h)

    def __call__(self, z, t):
        c_skip, c_out, _ = edm_precond(self.schedule, t, self.sigma_data)
        return c_skip * z + c_out * self.out(self.features(z, t))


class DiscriminatorHead(eqx.Module):
    """DMD2's GAN classifier: a small MLP on the fake-score network's bottleneck features.

    Features `(*spatial, C)` are mean-pooled over the spatial axes first, so the same head serves the
    vector MLP (`(C,)`) and image networks (`(h, w, C)`). Returns one logit (scalar).
    """

    mlp: eqx.nn.MLP

    def __init__(self, feat_dim, *, width=128, key):
        self.mlp = eqx.nn.MLP(feat_dim, "scalar", width, depth=2, activation=jax.nn.silu, key=key)

    def __call__(self, features):
        return self.mlp(einops.reduce(features, "... c -> c", "mean"))
