"""Generators for generative replay: variational autoencoders over the classifier's inputs.

The contract a generative-replay plugin relies on (any module may fulfil it):

* ``loss(x, y=None) -> dict[str, Tensor]``: named scalar terms (mean over the minibatch) whose sum is minimised;
* ``sample(n, y=None, generator=None) -> Tensor``: ``n`` inputs shaped like the data (``y``: the classes wanted, for a
  class-conditional generator; ``generator``: the ``torch.Generator`` all randomness is drawn from);
* ``conditional`` (bool): whether ``y`` is used.

The VAEs here model pixel intensities in [0, 1] with a Bernoulli likelihood (Kingma & Welling 2014, eq. 10, with
the binary cross-entropy as the reconstruction term): the classifier's inputs ``x`` are mapped to ``x * std + mean``
(the protocols' normalisation undone) and samples are mapped back, so the classifier sees generated inputs in its
own scale.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from streamcl.errors import ConfigError
from streamcl.datasets.fmnist import MEAN as FMNIST_MEAN, STD as FMNIST_STD


class VAE(nn.Module):
    """A VAE with a Gaussian encoder ``q(z|x) = N(mu(x), diag(sigma(x)^2))``, a standard normal prior (or, with
    ``n_classes``, a learned mean per class, drawn from N(0, 1) at first: the class-conditional prior of van de Ven
    et al. 2020), and a Bernoulli
    decoder ``p(x|z)``. ``encoder`` maps the [0, 1] inputs to features, ``decoder`` a latent to pixel logits of
    ``shape``. ``loss`` is the negative ELBO per sample, averaged over the minibatch:

        vae_recon = sum_pixels BCE(decoder(z), x01),   z = mu + sigma * eps,
        vae_kl    = 1/2 sum_j (sigma_j^2 + (mu_j - m_j)^2 - 1 - log sigma_j^2),

    ``m`` the prior's mean (0, or the class's learned mean). With ``condition="label"`` (a conditional VAE, Sohn et
    al. 2015) the prior is N(0, I) and the one-hot label is appended to the encoder's features and to ``z`` (the
    decoder takes ``latent + n_classes`` inputs). With ``likelihood="gaussian"`` (hidden features, which
    are not intensities) ``p(x|z) = N(decoder(z), I)`` on the inputs as they are: ``vae_recon = 1/2 sum (decoder(z) -
    x)^2``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, features: int, latent: int, shape: Sequence[int],
                 n_classes: int | None = None, mean: float = FMNIST_MEAN, std: float = FMNIST_STD,
                 likelihood: str = "bernoulli", condition: str = "prior"):
        super().__init__()
        if latent <= 0 or features <= 0:
            raise ConfigError(f"VAE: latent ({latent}) and features ({features}) must be positive")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ConfigError(f"VAE likelihood={likelihood!r}: 'bernoulli' (pixels in [0, 1]) or 'gaussian'")
        if condition not in ("prior", "label"):
            raise ConfigError(f"VAE condition={condition!r}: 'prior' (a learned mode per class) or 'label' (the "
                              "label fed to the encoder and the decoder)")
        self.likelihood, self.condition = likelihood, condition
        self.labels = n_classes if condition == "label" and n_classes is not None else 0
        self.encoder, self.decoder = encoder, decoder
        self.to_mu = nn.Linear(features + self.labels, latent)
        self.to_logvar = nn.Linear(features + self.labels, latent)
        self.shape, self.latent = tuple(shape), int(latent)
        self.mean, self.std = float(mean), float(std)
        self.conditional = n_classes is not None
        self.prior = nn.Embedding(n_classes, latent) if n_classes is not None and not self.labels else None
        if self.prior is not None:  # the class modes start apart (van de Ven et al. 2020 draw them from N(0, 1))
            nn.init.normal_(self.prior.weight)

    def to_unit(self, x: Tensor) -> Tensor:
        """The classifier's inputs as intensities in [0, 1] (Gaussian: as they are)."""
        x = x.reshape(x.shape[0], *self.shape)
        return x if self.likelihood == "gaussian" else (x * self.std + self.mean).clamp(0, 1)

    def from_unit(self, u: Tensor) -> Tensor:
        return u if self.likelihood == "gaussian" else (u - self.mean) / self.std

    def with_label(self, h: Tensor, y: Tensor | None) -> Tensor:
        """``h`` with the one-hot labels appended (``condition="label"``), else ``h``."""
        if not self.labels:
            return h
        if y is None:
            raise ConfigError("this VAE is conditioned on the label (condition='label'): give the classes y")
        return torch.cat([h, F.one_hot(y.to(h.device).long(), self.labels).to(h.dtype)], 1)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """The mean of ``p(x|z, y)`` in [0, 1] (Bernoulli) or the inputs' own scale (Gaussian)."""
        out = self.decoder(self.with_label(z, y)).reshape(len(z), *self.shape)
        return out if self.likelihood == "gaussian" else torch.sigmoid(out)

    def prior_mean(self, y: Tensor | None, n: int, like: Tensor) -> Tensor:
        if self.prior is None or y is None:
            return like.new_zeros(n, self.latent)
        return self.prior(y.to(like.device).long())

    def loss(self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        u = self.to_unit(x)
        h = self.with_label(self.encoder(u), y)
        mu, logvar = self.to_mu(h), self.to_logvar(h)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        out = self.decoder(self.with_label(z, y)).reshape(u.shape)
        if self.likelihood == "gaussian":  # unit variance: the log-likelihood up to a constant
            recon = 0.5 * (out - u).square().flatten(1).sum(1).mean()
        else:
            recon = F.binary_cross_entropy_with_logits(out, u, reduction="none").flatten(1).sum(1).mean()
        m = self.prior_mean(y, len(x), mu)
        kl = 0.5 * (logvar.exp() + (mu - m).square() - 1 - logvar).sum(1).mean()
        return {"vae_recon": recon, "vae_kl": kl}

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        like = self.to_mu.weight
        z = torch.randn(n, self.latent, generator=generator, dtype=like.dtype).to(like.device)
        z = z + self.prior_mean(y, n, like)
        return self.from_unit(self.decode(z, y))


def mlp_vae(shape: Sequence[int], hidden: Sequence[int] = (400, 400), latent: int = 100,
            n_classes: int | None = None, **kwargs) -> VAE:
    """A fully connected VAE on inputs of ``shape`` (van de Ven et al. 2020's MNIST VAE: two layers of 400 units,
    100 latent dimensions)."""
    size = math.prod(shape)
    enc: list[nn.Module] = [nn.Flatten()]
    width = size
    for h in hidden:
        enc += [nn.Linear(width, h), nn.ReLU()]
        width = h
    dec: list[nn.Module] = []
    w = latent + (n_classes or 0) * (kwargs.get("condition") == "label")
    for h in reversed(hidden):
        dec += [nn.Linear(w, h), nn.ReLU()]
        w = h
    dec.append(nn.Linear(w, size))
    return VAE(nn.Sequential(*enc), nn.Sequential(*dec), width, latent, shape, n_classes, **kwargs)


class _Unflatten(nn.Module):
    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


def conv_vae(shape: Sequence[int] = (1, 28, 28), channels: Sequence[int] = (16, 32), latent: int = 100,
             n_classes: int | None = None, **kwargs) -> VAE:
    """A small convolutional VAE on images of ``shape`` (C, H, W), H and W divisible by 4: two stride-2 3x3
    convolutions down, two transposed convolutions up."""
    c, height, width = shape
    if height % 4 or width % 4:
        raise ConfigError(f"conv_vae: images of {height}x{width}; height and width must be divisible by 4")
    c1, c2 = channels
    flat = c2 * (height // 4) * (width // 4)
    enc = nn.Sequential(_Unflatten(shape), nn.Conv2d(c, c1, 3, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 3, 2, 1), nn.ReLU(),
                        nn.Flatten())
    labels = (n_classes or 0) * (kwargs.get("condition") == "label")
    dec = nn.Sequential(nn.Linear(latent + labels, flat), nn.ReLU(), _Unflatten((c2, height // 4, width // 4)),
                        nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(c1, c, 4, 2, 1))
    return VAE(enc, dec, flat, latent, shape, n_classes, **kwargs)
