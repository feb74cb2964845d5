"""The paper's simplified positional-attention model and its gradient-descent training.

F(X) = sum_i sum_r sigma(<v_r, sum_j A_ij X_j>), sigma(t) = t^3, with A the positional attention of one layer of the
registry in `timm_posattn.layers` (the same layers the ViT's blocks use), over the D patches:
  * ``attention='logits'``: A = softmax(L), L a free (D, D) logit table: the paper's simplified model;
  * ``attention='qk'``: A = softmax((LN(P)·Wq)(LN(P)·Wk)ᵀ/√k) from a learned positional table P (D, k): the ViT's form;
  * ``attention='tied'``: the same with Wq = Wk (symmetric, positive semi-definite logits).
The activation has to be odd: a sum of ReLUs is never negative, so it cannot give the sign of y.

How the attention starts decides which of the many generalizing solutions gradient descent finds:
  * ``init='random'``: the layer's default (timm's ViT) init: attention close to uniform. Uniform attention is a fixed
    point (every row gets the same gradient); the small asymmetry lets each row concentrate on *some* hidden set.
  * ``init='local'``: the layer's local init, A ≈ softmax(beta·I): each patch first prefers itself, so the set that
    wins row i is i's own set: the patch association of the paper's theorem.
"""
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from timm.optim import create_optimizer_v2

from .association import association_metrics
from .layers import get_pos_attn_layer, list_pos_attn_layers
from .structured import StructuredConfig, make_structure, sample_structured

__all__ = [
    'SimplifiedPositionalModel', 'logistic_loss', 'accuracy', 'train_online', 'train_fixed', 'INITS', 'ATTENTION',
    'INIT',
]

INITS = ('local', 'random')
# The default form and init, chosen by measurement (docs/paper_experiments.md): the tied form (logits a Gram matrix
# of the learned positional table) learns own-set patch association from a random start, as the paper claims, where
# the free logit table ('logits') and the untied form ('qk') stay at chance; accuracy is the same.
ATTENTION = 'tied'
INIT = 'random'


class SimplifiedPositionalModel(nn.Module):
    """One positional attention layer over the D patches, followed by ``num_neurons`` cubic neurons, summed."""

    def __init__(
            self,
            num_patches: int,
            patch_dim: int,
            num_neurons: int = 4,
            attention: str = ATTENTION,
            init: str = INIT,
            beta: float = 1.0,
            pos_dim: Optional[int] = None,
            seed: int = 0,
    ):
        """
        Args:
            num_patches: D, the patches attention runs over (no class token).
            patch_dim: d, the dimension of a patch.
            num_neurons: cubic neurons of the readout.
            attention: a registered positional attention layer ('logits', 'qk', 'tied', ...).
            init: 'random' (the layer's default init) or 'local' (A ≈ softmax(beta·I)).
            beta: the self logit of the local init.
            pos_dim: k, the width of the positional table P (single head) for layers that read it; default D,
                so P·Pᵀ-type logits can reach any (D, D) structure (a narrower P escapes uniform attention less
                reliably: docs/paper_experiments.md).
            seed: seeds every parameter, so a model is a function of its arguments.
        """
        super().__init__()
        if init not in INITS:
            raise ValueError(f'expected init in {INITS}, got {init!r}')
        if attention not in list_pos_attn_layers():
            raise ValueError(f'expected attention in {list_pos_attn_layers()}, got {attention!r}')
        self.init, self.attention_form = init, attention
        self.grid_size = (1, num_patches)  # the patches as one row: no 2D structure is assumed
        pos_dim = num_patches if pos_dim is None else pos_dim
        g = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.attn = get_pos_attn_layer(attention)(pos_dim, 1, grid_size=self.grid_size, num_prefix_tokens=0)
            named_apply(init_weights_vit_timm, self.attn)  # the ViT's init of the same layer
        if init == 'local':
            self.attn.init_local(beta)
        # the positional table: unit-scale rows (the layers normalize it before projecting)
        self.pos = nn.Parameter(torch.randn(num_patches, pos_dim, generator=g)) if self.attn.uses_pos_table else None
        self.neurons = nn.Parameter(torch.randn(num_neurons, patch_dim, generator=g) / patch_dim ** 0.5)

    def attention(self) -> torch.Tensor:
        """The (D, D) positional attention matrix; rows sum to 1."""
        pos = self.pos if self.pos is not None else self.neurons.new_zeros(self.grid_size[1], 0)
        return self.attn(pos, self.grid_size)[0]

    def attention_parameters(self) -> List[nn.Parameter]:
        """What the attention is learned through: the layer and, where it reads one, the positional table."""
        return list(self.attn.parameters()) + ([self.pos] if self.pos is not None else [])

    def reset_neurons(self, seed: int = 0):
        """Draw new neurons (the readout of a new feature) while keeping the attention."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.neurons.copy_(torch.randn(self.neurons.shape, generator=g) / self.neurons.shape[1] ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1:] != (self.grid_size[1], self.neurons.shape[1]):
            raise ValueError(f'expected inputs (N, {self.grid_size[1]}, {self.neurons.shape[1]}), '
                             f'got {tuple(x.shape)}')
        mixed = torch.einsum('ij,njd->nid', self.attention(), x)
        return (mixed @ self.neurons.t()).pow(3).sum(dim=(1, 2))


def logistic_loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(-y F(X))) averaged, y in {-1, +1}."""
    return F.softplus(-y * output).mean()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Fraction of samples with sign(F(X)) == y."""
    correct = 0
    for start in range(0, len(x), batch_size):
        out = model(x[start:start + batch_size])
        correct += int((torch.sign(out) == y[start:start + batch_size]).sum())
    return correct / max(len(x), 1)


def _optimizer(params, lr: float):
    return create_optimizer_v2(params, opt='adam', lr=lr, weight_decay=0.0)


def train_online(
        model: SimplifiedPositionalModel,
        config: StructuredConfig,
        steps: int = 1500,
        batch_size: int = 256,
        lr: float = 0.01,
        seed: int = 0,
        feature: Optional[torch.Tensor] = None,
        eval_every: int = 50,
        callback: Optional[Callable[[Dict[str, float]], None]] = None,
) -> List[Dict[str, float]]:
    """Adam on the logistic loss with ``batch_size`` fresh samples per step (the population-loss regime).

    Every ``eval_every`` steps (and at the end) the attention is scored against the hidden partition; returns that
    history as a list of dicts ``step, loss, association, set_purity, partition_ari``.
    """
    partition, default_feature = make_structure(config)
    feature = default_feature if feature is None else feature
    optimizer = _optimizer(model.parameters(), lr)
    history = []
    loss_sum, loss_count = 0.0, 0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            record = dict(step=step, loss=loss_sum / loss_count if loss_count else float('nan'))
            record.update(association_metrics(model.attention(), partition))
            history.append(record)
            if callback is not None:
                callback(record)
            loss_sum, loss_count = 0.0, 0
        if step == steps:
            break
        # seeds of the online batches are disjoint from the evaluation seeds used by the experiments (< 10**6)
        x, y = sample_structured(config, batch_size, 10 ** 6 + seed * 100_003 + step, partition, feature)
        loss = logistic_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().item()
        loss_count += 1
    return history


def train_fixed(
        model: SimplifiedPositionalModel,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int = 500,
        lr: float = 0.01,
        train_attention: bool = True,
) -> float:
    """Full-batch Adam on a fixed training set (the few-sample downstream regime); returns the final loss.

    ``train_attention=False`` keeps the positional attention as it is and learns only the neurons.
    """
    attention = model.attention_parameters()
    for p in attention:
        p.requires_grad_(train_attention)
    optimizer = _optimizer([model.neurons] + (attention if train_attention else []), lr)
    loss = torch.tensor(float('nan'))
    for _ in range(steps):
        loss = logistic_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in attention:
        p.requires_grad_(True)
    return loss.detach().item()
