"""Patch-association metrics: how much of a positional attention matrix follows the hidden sets of the data.

For an attention matrix ``A`` (D, D) over patches (rows sum to 1) and the hidden partition (set id per patch):
  * ``association``: mean over patches i of the mass row i puts on i's own set; chance (uniform A) is C/D.
  * ``set_purity``: mean over patches of the largest mass a row puts on any one set; chance 1/L. High purity with low
    association means each patch attends to *a* whole set, but not its own.
  * ``partition_ari``: adjusted Rand index between the true sets and a k-means clustering (k = L) of the patches by
    their attention columns (who attends to them); 0 for chance, 1 when the sets are recovered exactly.
"""
from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = ['association_metrics', 'model_association', 'adjusted_rand_index', 'kmeans', 'patch_attention']


def adjusted_rand_index(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two flat clusterings; 1.0 when identical up to renaming."""
    a = np.asarray(labels_true).ravel()
    b = np.asarray(labels_pred).ravel()
    if a.shape != b.shape:
        raise ValueError(f'expected two labelings of the same length, got {a.shape[0]} and {b.shape[0]}')
    n = a.shape[0]
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def comb2(x):
        x = np.asarray(x, dtype=np.float64)
        return (x * (x - 1) / 2).sum()

    index = comb2(table)
    sum_a, sum_b = comb2(table.sum(1)), comb2(table.sum(0))
    expected = sum_a * sum_b / comb2(n)
    max_index = (sum_a + sum_b) / 2
    if max_index == expected:  # both clusterings trivial (all in one cluster, or all singletons)
        return 1.0 if index == max_index else 0.0
    return float((index - expected) / (max_index - expected))


def kmeans(points: np.ndarray, k: int, seed: int = 0, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding and ``n_init`` restarts; returns the labels of the best inertia.

    Small and deterministic (seeded); enough for clustering D <= a few hundred patches without scikit-learn.
    """
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f'expected 1 <= k <= number of points ({n}), got k={k}')
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = np.zeros(n, dtype=np.int64), np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = ((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1).min(1)
            total = d2.sum()
            if total <= 1e-20:  # all points coincide with a center: no further distinct centers exist
                break
            centers.append(x[rng.choice(n, p=d2 / total)])
        centers = np.asarray(centers)
        labels = np.zeros(n, dtype=np.int64)
        for it in range(iters):
            dist = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
            new_labels = dist.argmin(1)
            if it and np.array_equal(new_labels, labels):
                break
            labels = new_labels
            centers = np.stack([x[labels == c].mean(0) if (labels == c).any() else centers[c]
                                for c in range(len(centers))])
        inertia = ((x - centers[labels]) ** 2).sum()
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _check_inputs(attn: torch.Tensor, partition: torch.Tensor):
    attn = torch.as_tensor(attn).detach().double().cpu()
    partition = torch.as_tensor(partition).detach().long().cpu()
    if attn.ndim != 2 or attn.shape[0] != attn.shape[1]:
        raise ValueError(f'expected a square attention matrix (D, D), got shape {tuple(attn.shape)}')
    if partition.shape != (attn.shape[0],):
        raise ValueError(f'expected a partition of shape ({attn.shape[0]},) (one set id per patch), '
                         f'got {tuple(partition.shape)}')
    if (attn < -1e-6).any() or not torch.allclose(attn.sum(1), torch.ones(attn.shape[0], dtype=attn.dtype), atol=1e-3):
        raise ValueError('expected a row-stochastic attention matrix (non-negative, rows summing to 1)')
    return attn, partition


def association_metrics(attn: torch.Tensor, partition: torch.Tensor, seed: int = 0) -> Dict[str, float]:
    """Association, set purity and partition ARI of one attention matrix (D, D) over patches.

    Also returns ``chance`` (the association of uniform attention, mean |S(i)|/D) and ``chance_set_purity`` (1/L).
    """
    attn, partition = _check_inputs(attn, partition)
    _, set_index = torch.unique(partition, return_inverse=True)
    num_sets = int(set_index.max()) + 1
    one_hot = torch.nn.functional.one_hot(set_index, num_sets).double()  # (D, L)
    mass_per_set = attn @ one_hot  # (D, L): mass row i puts on each set
    own = mass_per_set.gather(1, set_index.unsqueeze(1)).squeeze(1)
    set_sizes = one_hot.sum(0)
    columns = attn.t().numpy()  # patch j described by who attends to it
    labels = kmeans(columns, num_sets, seed=seed)
    return dict(
        association=float(own.mean()),
        set_purity=float(mass_per_set.max(1).values.mean()),
        partition_ari=adjusted_rand_index(set_index.numpy(), labels),
        chance=float((set_sizes[set_index] / attn.shape[0]).mean()),
        chance_set_purity=1.0 / num_sets,
    )


def patch_attention(model: torch.nn.Module) -> torch.Tensor:
    """Positional attention among patches of a ``vit_posattn_*`` model: (blocks, heads, P, P), rows summing to 1.

    The class-token row and column are dropped and each row is renormalised over the patches, so the mass a patch
    puts on the class token does not count for or against any set.
    """
    if not hasattr(model, 'get_attention_maps'):
        raise TypeError(f'expected a vit_posattn_* model with get_attention_maps(), got {type(model).__name__}')
    with torch.no_grad():
        maps = model.get_attention_maps()
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f'expected get_attention_maps() of shape (blocks, heads, N, N), got {tuple(maps.shape)}')
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    patches = maps[..., prefix:, prefix:].float()
    return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


def model_association(
        model: torch.nn.Module,
        partition: torch.Tensor,
        blocks: Optional[Sequence[int]] = None,
        seed: int = 0,
) -> Dict[str, float]:
    """Association metrics of a ``vit_posattn_*`` model's positional attention against the hidden partition.

    The patch-to-patch maps (class token dropped, rows renormalised) are averaged over heads and over the
    positional blocks (all, or the model block indices ``blocks``), giving one (P, P)
    matrix that is scored with ``association_metrics``. Because heads of a real ViT specialise, the best single
    head is reported too (``best_head_association`` with its ``best_head`` = (model block index, head)).
    """
    maps = patch_attention(model)
    if blocks is not None:
        positional = list(getattr(model, 'pos_attn_indices', range(maps.shape[0])))
        missing = [b for b in blocks if b not in positional]
        if missing:
            raise ValueError(f'blocks {missing} are not positional-attention blocks; expected some of {positional}')
        maps = maps[[positional.index(b) for b in blocks]]
    partition = torch.as_tensor(partition).long()
    if maps.shape[-1] != partition.numel():
        raise ValueError(f'the model has {maps.shape[-1]} patches but the partition has {partition.numel()} entries')
    metrics = association_metrics(maps.mean(dim=(0, 1)), partition, seed=seed)
    _, set_index = torch.unique(partition, return_inverse=True)
    same_set = (set_index[:, None] == set_index[None, :]).float()
    per_head = (maps * same_set).sum(-1).mean(-1)  # (blocks, heads) association of each head
    flat = int(per_head.argmax())
    metrics['best_head_association'] = float(per_head.flatten()[flat])
    block_ids = list(blocks) if blocks is not None else list(getattr(model, 'pos_attn_indices', range(len(maps))))
    metrics['best_head'] = [int(block_ids[flat // per_head.shape[1]]), flat % per_head.shape[1]]
    return metrics
