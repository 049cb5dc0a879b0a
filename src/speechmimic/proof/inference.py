"""Dataset inference for speech encoders (after Dziedzic et al., NeurIPS 2022): is a suspect more
"at home" on the owner's private clips than on public ones?

The suspect's pooled representations (time mean of each chosen layer, L2-normalised, side by side)
of half of the private clips are reduced by PCA and fitted with a Gaussian mixture; the
log-likelihoods of the other half are compared with those of the public clips by a one-sided Welch
t-test. An encoder derived from one trained on the private clips should find them likelier than
public clips of the same kind; an independent one should not. The private and public clips must be
drawn alike (same sources, same lengths), or the test measures their difference instead. No change
to the model is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from speechmimic.errors import InputError
from speechmimic.proof.watermark import ALPHA, layer_indices


@torch.no_grad()
def embeddings(upstream: nn.Module, wavs: list[np.ndarray], layers: list[str] | None = None) -> np.ndarray:
    """(N, D): each clip's chosen layers (default all states), time-mean and L2-normalised."""
    chosen = layer_indices(upstream, layers) if layers else list(range(len(upstream.hidden_state_names)))
    rows = []
    for wav in wavs:
        states = upstream([torch.from_numpy(np.asarray(wav, np.float32))])["hidden_states"]
        rows.append(
            np.concatenate(
                [(m := states[i][0].float().mean(0).numpy()) / (np.linalg.norm(m) + 1e-8) for i in chosen]
            )
        )
    return np.stack(rows)


def dataset_inference(
    upstream: nn.Module,
    private: list[np.ndarray],
    public: list[np.ndarray],
    layers: list[str] | None = None,
    groups: list[str] | None = None,
    components: int = 4,
    dims: int = 16,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict:
    """The one-sided test that the held-out private half is likelier than the public clips under a
    density fitted on the other private half; the p-value and the verdict at ``alpha``. ``groups``
    (e.g. each private clip's source file): the halves never share one, as the public clips share
    none with the private ones; segments of one recording on both sides would look "at home" to
    any model."""
    if len(private) < 8 or len(public) < 4:
        raise InputError(
            f"dataset inference needs >= 8 private and >= 4 public clips, "
            f"got {len(private)} and {len(public)}"
        )
    groups = groups if groups is not None else [str(i) for i in range(len(private))]
    names = sorted(set(groups))
    if len(names) < 4:
        raise InputError(f"dataset inference needs private clips from >= 4 sources, got {len(names)}")
    fit_groups = {names[i] for i in np.random.default_rng(seed).permutation(len(names))[: len(names) // 2]}
    fit_idx = np.array([i for i, g in enumerate(groups) if g in fit_groups])
    held_idx = np.array([i for i, g in enumerate(groups) if g not in fit_groups])
    # here, not at the top: scipy.stats and scikit-learn are 100 MB in every command that imports us
    from scipy.stats import ttest_ind
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x_private = embeddings(upstream, private, layers)
    x_public = embeddings(upstream, public, layers)
    fit = x_private[fit_idx]
    pca = PCA(n_components=min(dims, len(fit) - 1, fit.shape[1]), random_state=seed).fit(fit)
    k = max(1, min(components, len(fit) // 10))
    gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-4, random_state=seed).fit(
        pca.transform(fit)
    )
    ll_held = gmm.score_samples(pca.transform(x_private[held_idx]))
    ll_public = gmm.score_samples(pca.transform(x_public))
    t, p = ttest_ind(ll_held, ll_public, equal_var=False, alternative="greater")
    return {
        "t": round(float(t), 4),
        "p_value": float(p),
        "private_ll": round(float(ll_held.mean()), 4),
        "public_ll": round(float(ll_public.mean()), 4),
        "private_clips": len(held_idx),
        "public_clips": len(public),
        "verdict": "derived from the owner's" if p < alpha else "not shown",
    }
