"""The paper's experiments on the simplified model, one command each.

    python -m timm_posattn.paper association --out DIR [--quick] [--init local|random] [--attention logits|qk|tied]
    python -m timm_posattn.paper transfer --out DIR [--quick] [--init local|random] [--attention logits|qk|tied]

``association`` trains the simplified model on the structured dataset and scores its attention against the hidden
sets (``DIR/results.json``, ``DIR/attention.png``, ``DIR/metrics.png``). ``transfer`` pretrains on w*, then learns
a new feature w' (orthogonal to w*, same hidden sets) from n samples, keeping the pretrained attention or training
from scratch, averaged over seeds (``DIR/results.json``, ``DIR/transfer.png``). See docs/paper_experiments.md.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .association import association_metrics
from .cli import ArgumentParser, UsageError, float_range, int_range, run_command
from .files import atomic_write
from .layers import list_pos_attn_layers
from .outputs import OutputFolder
from .plots import pyplot
from .simplified import ATTENTION, INIT, INITS, SimplifiedPositionalModel, accuracy, train_fixed, train_online
from .structured import StructuredConfig, make_structure, orthogonal_feature, sample_structured

__all__ = [
    'TrainSettings', 'association_experiment', 'transfer_experiment', 'save_attention_heatmap',
    'save_metrics_plot', 'save_transfer_plot', 'main', 'run', 'ATTENTION', 'INIT',
]

_TEST_SEED = 12345  # test samples; training batches use seeds >= 10**6 (see simplified.train_online)


@dataclass
class TrainSettings:
    """Optimisation of the simplified model: Adam on fresh batches (pretraining), full batch downstream."""
    steps: int = 1500
    batch_size: int = 256
    lr: float = 0.01
    num_neurons: int = 4
    beta: float = 1.0  # local init: logits beta * I
    eval_every: int = 50
    num_test: int = 4000
    downstream_steps: int = 300
    downstream_lr: float = 0.01


# The settings the commands run. The full association run uses the image form's shape (64 patches, d=48, 8 sets);
# --quick uses 16 patches in 4 sets. The transfer regime is noisier (sigma 0.4) and has small sets (C = 4 or 8 of
# D = 32 or 64): counting +-w' patches without the sets is then a poor classifier, so a model that must find the sets
# from n samples falls clearly behind one that keeps the pretrained attention.
PRESETS: Dict[str, Dict] = {
    'association': dict(
        full=(StructuredConfig(num_patches=64, num_sets=8, patch_dim=48, q=0.5, sigma=0.2), TrainSettings()),
        quick=(StructuredConfig(num_patches=16, num_sets=4, patch_dim=32, q=0.5, sigma=0.3),
               TrainSettings(steps=800, eval_every=25)),
    ),
    'transfer': dict(
        full=(StructuredConfig(num_patches=64, num_sets=8, patch_dim=48, q=0.5, sigma=0.4),
              TrainSettings(steps=1500, eval_every=1500)),
        quick=(StructuredConfig(num_patches=32, num_sets=8, patch_dim=32, q=0.5, sigma=0.4),
               TrainSettings(steps=800, eval_every=800, num_test=2000)),
    ),
}
TRANSFER_NS = dict(full=[4, 8, 16, 32, 64, 128, 256], quick=[4, 16, 64, 256])
TRANSFER_SEEDS = dict(full=5, quick=3)
OUTPUTS = dict(association=('results.json', 'attention.png', 'metrics.png'), transfer=('results.json', 'transfer.png'))


def _save_figure(fig, path: str) -> str:
    plt = pyplot()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120, bbox_inches='tight'))
    finally:
        plt.close(fig)


def save_attention_heatmap(attn: torch.Tensor, partition: torch.Tensor, path: str, title: str = '') -> str:
    """Heatmap of a (D, D) attention matrix with rows and columns ordered by hidden set, set borders drawn."""
    plt = pyplot()
    order = torch.argsort(partition, stable=True)
    ordered = attn.detach()[order][:, order].cpu().numpy()
    sets = partition[order].tolist()
    borders = [i - 0.5 for i in range(1, len(sets)) if sets[i] != sets[i - 1]]
    fig, ax = plt.subplots(figsize=(6, 5.2))
    im = ax.imshow(ordered, cmap='viridis', vmin=0)
    for b in borders:
        ax.axhline(b, color='white', lw=0.6)
        ax.axvline(b, color='white', lw=0.6)
    ax.set_xlabel('key patch (ordered by hidden set)')
    ax.set_ylabel('query patch (ordered by hidden set)')
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='attention')
    return _save_figure(fig, path)


def save_metrics_plot(history: List[Dict[str, float]], path: str, chance: float, chance_set_purity: float) -> str:
    """Association, set purity, ARI (with their chance levels) and training loss over the steps."""
    plt = pyplot()
    steps = [h['step'] for h in history]
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    # association and set_purity coincide once every row prefers its own set: draw them so both stay visible
    for key, color, style, width, level in (('association', 'C0', '-', 3.0, chance),
                                            ('set_purity', 'C1', '--', 1.5, chance_set_purity),
                                            ('partition_ari', 'C2', '-', 1.5, 0.0)):
        ax.plot(steps, [h[key] for h in history], color=color, ls=style, lw=width, label=key)
        ax.axhline(level, color=color, ls=':', lw=1.0, label=f'{key} chance')
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel('step')
    ax.set_title('attention vs hidden sets')
    ax.legend(fontsize=8)
    loss_steps = [s for s, h in zip(steps, history) if h['loss'] == h['loss']]
    ax_loss.plot(loss_steps, [h['loss'] for h in history if h['loss'] == h['loss']], color='C3')
    ax_loss.set_yscale('log')
    ax_loss.set_xlabel('step')
    ax_loss.set_title('training loss (mean since last point)')
    return _save_figure(fig, path)


def save_transfer_plot(results: Dict, path: str) -> str:
    """Downstream test accuracy against the number of samples n: pretrained attention vs from scratch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, color in (('pretrained', 'pretrained attention (frozen)', 'C0'), ('scratch', 'from scratch', 'C1')):
        mean = torch.tensor(results[key])
        std = torch.tensor(results[f'{key}_std'])
        ax.plot(results['n'], mean, 'o-', color=color, label=label)
        ax.fill_between(results['n'], mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xscale('log', base=2)
    ax.set_xlabel('downstream training samples n')
    ax.set_ylabel('test accuracy')
    ax.set_ylim(0.45, 1.02)
    ax.axhline(0.5, color='gray', ls=':', lw=0.8)
    ax.set_title(f"transfer to new feature w' orthogonal to w* (mean ± std over {results['num_seeds']} seeds)\n"
                 f"init={results['init']}, attention={results['attention']}", fontsize=9)
    ax.legend()
    return _save_figure(fig, path)


def _build_model(config: StructuredConfig, settings: TrainSettings, init: str, attention: str, seed: int
                 ) -> SimplifiedPositionalModel:
    return SimplifiedPositionalModel(config.num_patches, config.patch_dim, settings.num_neurons, attention=attention,
                                     init=init, beta=settings.beta, seed=seed)


def association_experiment(
        config: StructuredConfig,
        settings: TrainSettings,
        init: str = INIT,
        seed: int = 0,
        out_dir: Optional[str] = None,
        attention: str = ATTENTION,
        log: bool = False,
) -> Dict:
    """Train the simplified model once and measure accuracy and patch association; plots go to ``out_dir``."""
    start = time.time()
    torch.manual_seed(seed)
    partition, feature = make_structure(config)
    model = _build_model(config, settings, init, attention, seed)

    def report(record):
        if log:
            print(f"step {record['step']:5d}  loss {record['loss']:.4f}  association {record['association']:.3f}  "
                  f"set_purity {record['set_purity']:.3f}  ARI {record['partition_ari']:.3f}", flush=True)

    history = train_online(model, config, settings.steps, settings.batch_size, settings.lr, seed=seed,
                           eval_every=settings.eval_every, callback=report)
    x_test, y_test = sample_structured(config, settings.num_test, _TEST_SEED + seed, partition, feature)
    attn = model.attention().detach()
    metrics = association_metrics(attn, partition)
    results = dict(
        experiment='association', init=init, attention=attention, seed=seed,
        test_accuracy=accuracy(model, x_test, y_test), **metrics,
        config=asdict(config), settings=asdict(settings), history=history,
        partition=partition.tolist(), elapsed_s=round(time.time() - start, 1),
    )
    if out_dir is not None:
        title = (f"init={init}, attention={attention}: association {metrics['association']:.2f} "
                 f"(chance {metrics['chance']:.2f}), purity {metrics['set_purity']:.2f}, "
                 f"ARI {metrics['partition_ari']:.2f}, test acc {results['test_accuracy']:.3f}")
        results['files'] = [
            os.path.basename(save_attention_heatmap(attn, partition, os.path.join(out_dir, 'attention.png'), title)),
            os.path.basename(save_metrics_plot(history, os.path.join(out_dir, 'metrics.png'), metrics['chance'],
                                               metrics['chance_set_purity'])),
        ]
    return results


def transfer_experiment(
        config: StructuredConfig,
        settings: TrainSettings,
        ns: Sequence[int],
        num_seeds: int = 3,
        init: str = INIT,
        out_dir: Optional[str] = None,
        log: bool = False,
        attention: str = ATTENTION,
) -> Dict:
    """For each seed: pretrain on w*, then for each n learn w' from n samples (a) with the pretrained attention
    frozen and fresh neurons, (b) from scratch with the same init; test accuracies are averaged over seeds."""
    start = time.time()
    partition, feature = make_structure(config)
    pretrained_acc = torch.zeros(num_seeds, len(ns))
    scratch_acc = torch.zeros(num_seeds, len(ns))
    pretrain_metrics = []
    for s in range(num_seeds):
        torch.manual_seed(s)
        base = _build_model(config, settings, init, attention, seed=s)
        train_online(base, config, settings.steps, settings.batch_size, settings.lr, seed=s,
                     eval_every=settings.eval_every)
        x_up, y_up = sample_structured(config, settings.num_test, _TEST_SEED + s, partition, feature)
        up = association_metrics(base.attention().detach(), partition)
        up['test_accuracy'] = accuracy(base, x_up, y_up)
        pretrain_metrics.append(up)
        new_feature = orthogonal_feature(feature, seed=1000 + s)
        x_test, y_test = sample_structured(config, settings.num_test, _TEST_SEED + 500 + s, partition, new_feature)
        for k, n in enumerate(ns):
            x, y = sample_structured(config, n, 2000 + 100 * s + k, partition, new_feature)
            transferred = _build_model(config, settings, init, attention, seed=s)
            transferred.load_state_dict(base.state_dict())
            transferred.reset_neurons(seed=3000 + s)
            train_fixed(transferred, x, y, settings.downstream_steps, settings.downstream_lr, train_attention=False)
            pretrained_acc[s, k] = accuracy(transferred, x_test, y_test)
            scratch = _build_model(config, settings, init, attention, seed=5000 + s)
            train_fixed(scratch, x, y, settings.downstream_steps, settings.downstream_lr, train_attention=True)
            scratch_acc[s, k] = accuracy(scratch, x_test, y_test)
            if log:
                print(f'seed {s}  n {n:5d}  pretrained {pretrained_acc[s, k]:.3f}  scratch {scratch_acc[s, k]:.3f}',
                      flush=True)
    results = dict(
        experiment='transfer', init=init, attention=attention, num_seeds=num_seeds, n=list(ns),
        pretrained=pretrained_acc.mean(0).tolist(), scratch=scratch_acc.mean(0).tolist(),
        pretrained_std=pretrained_acc.std(0, unbiased=False).tolist(),
        scratch_std=scratch_acc.std(0, unbiased=False).tolist(),
        pretrained_per_seed=pretrained_acc.tolist(), scratch_per_seed=scratch_acc.tolist(),
        pretrain=pretrain_metrics, config=asdict(config), settings=asdict(settings),
        elapsed_s=round(time.time() - start, 1),
    )
    if out_dir is not None:
        results['files'] = [os.path.basename(save_transfer_plot(results, os.path.join(out_dir, 'transfer.png')))]
    return results


_TRANSFER_ONLY = ('n', 'seeds', 'downstream_steps')
_ASSOCIATION_ONLY = ('seed',)
_DATASET_OPTIONS = ('num_patches', 'num_sets', 'patch_dim', 'q', 'sigma')


def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def _parse_args(argv: Optional[Sequence[str]]):
    parser = ArgumentParser(prog='python -m timm_posattn.paper', description=__doc__.split('\n\n')[0])
    parser.add_argument('experiment', choices=('association', 'transfer'))
    parser.add_argument('--out', required=True, help='output folder (created if missing)')
    parser.add_argument('--quick', action='store_true', help='small setting that runs in well under two minutes')
    parser.add_argument('--init', choices=INITS, default=INIT,
                        help=f"random: the layer's default init (attention near uniform); local: A ~ softmax(beta*I) "
                             f"(default: {INIT})")
    parser.add_argument('--attention', choices=list_pos_attn_layers(), default=ATTENTION,
                        help=f'positional attention layer of the simplified model (default: {ATTENTION})')
    parser.add_argument('--seed', type=int_range(0), default=None, help='association: model and sample seed (0)')
    parser.add_argument('--steps', type=int_range(1), default=None, help='override the number of (pre)training steps')
    parser.add_argument('--downstream-steps', type=int_range(1), default=None,
                        help='transfer: full-batch steps per fit')
    parser.add_argument('--seeds', type=int_range(1), default=None,
                        help='transfer: number of seeds (at least 3 advised)')
    parser.add_argument('--n', type=int_range(1), nargs='+', default=None, help='transfer: downstream sample counts')
    parser.add_argument('--num-patches', type=int_range(1), default=None, help='override the dataset num_patches (D)')
    parser.add_argument('--num-sets', type=int_range(1), default=None,
                        help='override the dataset num_sets (L, must divide num_patches)')
    parser.add_argument('--patch-dim', type=int_range(2), default=None, help='override the dataset patch_dim (d)')
    parser.add_argument('--q', type=float_range(0, 1), default=None, help='override the dataset q')
    parser.add_argument('--sigma', type=float_range(0), default=None, help='override the dataset sigma')
    parser.add_argument('--threads', type=int_range(1), default=1,
                        help='torch CPU threads (tiny matrices: 1 is fastest)')
    parser.add_argument('--overwrite', action='store_true',
                        help="replace this experiment's files in --out (results.json and its plots; nothing else)")
    args = parser.parse_args(argv)
    other = 'association' if args.experiment == 'transfer' else 'transfer'
    for dest in _ASSOCIATION_ONLY if args.experiment == 'transfer' else _TRANSFER_ONLY:
        if getattr(args, dest) is not None:
            parser.error(f'{_flag(dest)} applies to the {other} experiment only, not to {args.experiment}')
    return args


def _resolve_settings(args) -> Tuple[str, StructuredConfig, TrainSettings]:
    """The preset's dataset and training settings with the command line's overrides, checked together."""
    preset = 'quick' if args.quick else 'full'
    config, settings = PRESETS[args.experiment][preset]
    overrides = {k: getattr(args, k) for k in _DATASET_OPTIONS if getattr(args, k) is not None}
    try:
        config = replace(config, **overrides)
    except ValueError as e:  # StructuredConfig checks the combination (e.g. equal-size sets)
        given = ' '.join(f'{_flag(k)} {v}' for k, v in overrides.items())
        base = ', '.join(f'{k}={getattr(config, k)}' for k in _DATASET_OPTIONS)
        raise UsageError(f'{given} over the {preset} preset ({base}): {e}') from None
    if args.steps is not None:
        settings = replace(settings, steps=args.steps, eval_every=min(settings.eval_every, args.steps))
    if args.downstream_steps is not None:
        settings = replace(settings, downstream_steps=args.downstream_steps)
    return preset, config, settings


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run one experiment; errors the user can fix raise `UsageError` (`run` prints them as one line)."""
    args = _parse_args(argv)
    preset, config, settings = _resolve_settings(args)
    folder = OutputFolder(args.out, OUTPUTS[args.experiment], overwrite=args.overwrite,
                          command=f'python -m timm_posattn.paper {args.experiment}', key='paper').check()
    # the results and plots are computed into a staging folder and replace the previous ones only when all are
    # written (outputs.FolderClaim): an error or a kill during the run leaves the previous results as they were
    with folder.claim() as claim:
        results = _run_experiment(args, preset, config, settings, str(claim.staging_folder()))
        results['command'] = ' '.join(['python -m timm_posattn.paper'] + list(sys.argv[1:] if argv is None else argv))
        claim.stage_text('results.json', json.dumps(results, indent=2))
        paths = claim.commit(OUTPUTS[args.experiment])
    print(f'wrote {", ".join(paths)}')
    return results


def _run_experiment(args: argparse.Namespace, preset: str, config: StructuredConfig, settings: TrainSettings,
                    out_dir: str) -> Dict:
    torch.set_num_threads(args.threads)  # the matrices are tiny: extra threads only add synchronisation
    if args.experiment == 'association':
        seed = 0 if args.seed is None else args.seed
        results = association_experiment(config, settings, init=args.init, seed=seed, out_dir=out_dir, log=True,
                                         attention=args.attention)
        print(f"test_accuracy {results['test_accuracy']:.4f}  association {results['association']:.3f} "
              f"(chance {results['chance']:.3f})  set_purity {results['set_purity']:.3f} "
              f"(chance {results['chance_set_purity']:.3f})  partition_ari {results['partition_ari']:.3f}")
    else:
        ns = TRANSFER_NS[preset] if args.n is None else args.n
        num_seeds = TRANSFER_SEEDS[preset] if args.seeds is None else args.seeds
        results = transfer_experiment(config, settings, ns, num_seeds=num_seeds, init=args.init, out_dir=out_dir,
                                      log=True, attention=args.attention)
        for n, p, s in zip(results['n'], results['pretrained'], results['scratch']):
            print(f'n {n:5d}  pretrained {p:.3f}  scratch {s:.3f}')
    results['preset'] = preset
    return results


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: one line and exit code 2 for errors the user can fix (see `timm_posattn.cli`)."""
    return run_command(lambda: main(argv), argv, on_interrupt=lambda: 'nothing saved: results.json and the plots '
                                                                        'replace the previous ones when the run '
                                                                        'completes')


if __name__ == '__main__':
    sys.exit(run())
