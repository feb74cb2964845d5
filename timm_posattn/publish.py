"""Publish a train.py checkpoint as a Hugging Face Hub model folder (and optionally upload it).

    python -m timm_posattn.publish --checkpoint output/train/.../model_best.pth.tar \\
        --model vit_posattn_small_patch4_32.cifar10 --out hub/vit_posattn_small_patch4_32.cifar10 \\
        --results output/train/.../summary.csv [--repo-id timm-posattn/vit_posattn_small_patch4_32.cifar10]

The checkpoint is read through `timm_posattn.loading` (its model kwargs, its EMA weights when it has them,
non-finite weights refused). The folder is timm's own format (``timm.models.save_for_hf``: model.safetensors +
config.json) plus a model card (README.md) rendered from ``model_cards/`` with numbers measured on this checkpoint
only. It is built in a temporary folder, loaded back with `timm_posattn.loading.load_model('local-dir:...')` and
compared with the source model's logits; only then is each of the three files moved into ``--out`` atomically.
``--out`` may hold other files (a run folder, notes): publish owns those three names and never touches anything
else. With ``--repo-id`` only those files are uploaded. With ``--dataset`` (and ``--data-dir``) the verified folder
is evaluated on that dataset's evaluation split by `timm_posattn.evaluation` (validate.py's code), and the card
reports that top-1/top-5, measured on exactly the published weights, with the split and its number of images.
"""
import argparse
import importlib
import inspect
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from timm.models import save_for_hf, split_model_name_tag
from timm.utils import reparameterize_model

from .cli import ArgumentParser, UsageError, device_arg, float_range, int_range, one_line, run_command
from .loading import (
    PREPROCESSING_ARGS, PREPROCESSING_KEYS, add_ema_arguments, load_model, model_from_checkpoint, read_checkpoint,
    require_registered,
)
from .flops import forward_gmacs
from .machine import cpu_name
from .evaluation import (
    evaluate_dataset, model_input_channels, open_eval_dataset, resolve_data, resolve_preprocessing, split_name,
)
from .model_card import (
    card_dataset, check_result_matches_checkpoint, describe_architecture, find_card_template, read_summary,
    render_model_card, select_result,
)
from .outputs import OutputFolder
from .published import RECORD_KEY, WEIGHTS_NAME, publish_record

_logger = logging.getLogger('timm_posattn.publish')

PUBLISHED_FILES = ('config.json', WEIGHTS_NAME, 'README.md')  # what publish owns in --out, and uploads
# files of a Hub repo that mean "a model is already published here"
_HUB_MODEL_FILES = ('config.json', WEIGHTS_NAME, 'pytorch_model.bin')


class VerificationError(UsageError):
    """The written folder does not reproduce the source model; nothing is published."""


class RefusedOverwrite(UsageError):
    """The Hub repo's branch already holds a model and --force was not given."""


class HubError(UsageError):
    """The Hugging Face Hub could not be reached or refused a request."""


def data_config_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing train.py used (mean/std/crop/interpolation), for config.json's pretrained_cfg."""
    return {k: args[k] for k in PREPROCESSING_ARGS if args.get(k) not in (None, '')}


def count_gmacs(model: torch.nn.Module, input_size: Sequence[int]) -> float:
    """GMACs of one inference forward of one image (`timm_posattn.flops`: fused attention counted too)."""
    return forward_gmacs(model, input_size)


def measure_model(model: torch.nn.Module, input_size: Sequence[int], device: str = 'cpu', batch_size: int = 64,
                  min_seconds: float = 1.0, benchmark: bool = True) -> Dict[str, Any]:
    """Params, GMACs and inference img/s on this machine.

    ``gmacs``: the model as loaded, which computes each positional block's attention A in every forward.
    ``gmacs_reparameterized``: after `timm.utils.reparameterize_model`, which bakes A into buffers for inference at
    the model's input size (models without positional blocks give the same number twice). The throughput is the
    model as loaded.
    """
    model.eval()
    stats: Dict[str, Any] = dict(
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        gmacs=count_gmacs(model, input_size),
        gmacs_reparameterized=count_gmacs(reparameterize_model(model), input_size),  # a copy: model is unchanged
    )
    if not benchmark:
        return stats
    bench_model = model.to(device)
    x = torch.randn(batch_size, *input_size, device=device)
    with torch.no_grad():
        bench_model(x)  # warm-up
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        iters, start = 0, time.perf_counter()
        while True:
            bench_model(x)
            iters += 1
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and iters >= 3:
                break
    model.to('cpu')
    stats['img_per_sec'] = iters * batch_size / elapsed
    stats['bench_device'] = _describe_device(device)
    stats['bench_batch_size'] = batch_size
    return stats


def _describe_device(device: str) -> str:
    if device.startswith('cuda'):
        return f'{torch.cuda.get_device_name(device)} (fp32, torch {torch.__version__})'
    return f'CPU {cpu_name()}, {torch.get_num_threads()} threads (fp32, torch {torch.__version__})'


def export_folder(model: torch.nn.Module, folder: Path, data_config: Dict[str, Any],
                  model_config: Dict[str, Any], model_args: Dict[str, Any]) -> None:
    """Write timm's Hub format (model.safetensors + config.json) into ``folder``.

    The preprocessing also goes in as pretrained_cfg overrides, so timm versions whose save_for_hf has no
    ``data_config`` argument still record it; the model kwargs are passed explicitly, since timm before 1.0.31 does
    not record them itself (a Hub load would otherwise rebuild the entrypoint's defaults, e.g. another depth).
    """
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in PREPROCESSING_KEYS}
    model_config = dict(model_config, pretrained_cfg={**overrides, **model_config.get('pretrained_cfg', {})})
    extra = {'data_config': data_config} if 'data_config' in inspect.signature(save_for_hf).parameters else {}
    save_for_hf(model, folder, model_config=model_config, model_args=model_args, safe_serialization=True, **extra)


def verify_folder(folder: Path, source: torch.nn.Module, atol: float = 1e-5, seed: int = 0) -> float:
    """Load the folder back like a user would (sha256 checked) and compare logits with the source model."""
    loaded = load_model(f'local-dir:{folder}').model.eval()
    input_size = loaded.pretrained_cfg['input_size']
    if loaded.num_classes != source.num_classes:
        raise VerificationError(f'the folder loaded back has {loaded.num_classes} classes, the source model '
                                f'{source.num_classes}; nothing was published')
    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (loaded(x) - source(x)).abs().max().item()
    if not diff <= atol:
        raise VerificationError(f'the logits of the folder loaded back differ from the source model by {diff:.3g} '
                                f'(> --atol {atol:g}); nothing was published')
    return diff


def tag_rebuilds_model(source: torch.nn.Module, architecture: str, input_size: Sequence[int], atol: float = 1e-5,
                       seed: int = 0) -> Optional[str]:
    """Whether `timm.create_model('ARCH.TAG', pretrained=True)` would rebuild these weights: a registered tag builds
    the architecture's defaults with its cfg's input size and classes (``architecture`` may name the tag: a
    `.fashion_mnist` tag builds 1 x 28 x 28) and cannot pass model kwargs (only `hf-hub:` reads config.json's
    model_args). None when it would; otherwise why not, in words."""
    import timm
    default = timm.create_model(architecture, num_classes=source.num_classes).eval()
    ours, theirs = source.state_dict(), default.state_dict()
    differ = sorted(set(ours) ^ set(theirs)) + [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape]
    if differ:
        return (f'its weights do not fit the default {architecture} ({len(differ)} tensors missing, extra or of '
                f'another shape, e.g. {differ[0]}; the checkpoint was trained with other model kwargs)')
    default.load_state_dict(ours)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            diff = (default(x) - source.eval()(x)).abs().max().item()
    except (AssertionError, RuntimeError, ValueError) as e:
        return f'the default {architecture} does not take its inputs ({one_line(e)[:160]})'
    if not diff <= atol:
        return f'the default {architecture} computes other logits with its weights (max difference {diff:.3g})'
    return None


def _matching_label_names(model: torch.nn.Module) -> Optional[Sequence[str]]:
    """Label names of the model's own pretrained cfg, when they fit its classifier."""
    names = model.pretrained_cfg.get('label_names')
    return names if names and len(names) == model.num_classes else None


def _network_errors() -> Tuple[type, ...]:
    """What huggingface_hub raises when the Hub is unreachable or refuses: OSError covers offline mode
    (OfflineModeIsEnabled) and requests' errors; newer versions raise httpx2 / httpx errors."""
    from huggingface_hub.errors import HfHubHTTPError
    errors = [OSError, HfHubHTTPError]
    for module in ('httpx2', 'httpx'):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _on_hub(what: str, call: Callable[..., Any], *args: Any, passthrough: Tuple[type, ...] = (), **kwargs: Any
            ) -> Any:
    """A Hub API call; an unreachable or refusing Hub is one line naming what was being done (`passthrough`:
    errors the caller handles)."""
    try:
        return call(*args, **kwargs)
    except passthrough:
        raise
    except _network_errors() as e:
        detail = one_line(e)[:300] or type(e).__name__
        raise HubError(f'{what}: the Hugging Face Hub could not be reached or refused ({detail})') from None


def _hf_api(token: Optional[str] = None):
    from huggingface_hub import HfApi
    return HfApi(token=token, library_name='timm_posattn')


def check_upload_allowed(repo_id: str, revision: Optional[str] = None, force: bool = False, api=None) -> bool:
    """Refuse (RefusedOverwrite) when the repo's branch already holds a model and ``force`` is off.

    Returns whether the branch exists.
    """
    from huggingface_hub.errors import RevisionNotFoundError
    api = api or _hf_api()
    branch = revision or 'main'
    if not _on_hub(f'checking {repo_id}', api.repo_exists, repo_id):
        return False
    try:
        existing = set(_on_hub(f'listing {repo_id}@{branch}', api.list_repo_files, repo_id, revision=branch,
                               passthrough=(RevisionNotFoundError,)))
    except RevisionNotFoundError:
        return False
    clash = sorted(existing.intersection(_HUB_MODEL_FILES))
    if clash and not force:
        raise RefusedOverwrite(f'{repo_id}@{branch} already holds {clash}; pass --force to overwrite it, or '
                               f'--revision NEW_BRANCH')
    return True


def upload_folder(folder: Path, repo_id: str, revision: Optional[str] = None, force: bool = False,
                  private: bool = False, commit_message: Optional[str] = None, token: Optional[str] = None):
    """Upload publish's files of ``folder`` (and nothing else in it); refuses when the repo (branch) already holds
    a model and ``force`` is off. The token comes from ``token``, else huggingface_hub's usual sources (HF_TOKEN,
    ``hf auth login``)."""
    api = _hf_api(token)
    branch = revision or 'main'
    branch_exists = check_upload_allowed(repo_id, revision, force, api)
    _on_hub(f'creating {repo_id}', api.create_repo, repo_id, private=private, exist_ok=True)
    if branch != 'main' and not branch_exists:
        _on_hub(f'creating branch {branch} of {repo_id}', api.create_branch, repo_id, branch=branch, exist_ok=True)
    return _on_hub(f'uploading to {repo_id}@{branch}', api.upload_folder, repo_id=repo_id, folder_path=str(folder),
                   revision=branch, allow_patterns=list(PUBLISHED_FILES),
                   commit_message=commit_message or f'Publish {repo_id} with timm_posattn.publish')


def release_entry(repo_id: str, commit: Optional[str], weights_sha256: str) -> Dict[str, Any]:
    """The releases.json entry that makes a tag advertise these weights."""
    return dict(status='published', hf_hub_id=repo_id, revision=commit, sha256=weights_sha256)


def open_card_dataset(ckpt: Any, source: torch.nn.Module, dataset: Optional[str], data_dir: Optional[str]
                      ) -> Tuple[Dict[str, Any], Any]:
    """The evaluation split of ``dataset`` (an image folder with only ``data_dir``) as validate.py would read it for
    this checkpoint, opened in the model's channel count before any work (a missing or damaged dataset is one line)."""
    data = resolve_data(ckpt, dataset=dataset or '', data_dir=data_dir, split='validation')
    channels = {'input_size': (model_input_channels(source), 1, 1)}  # only the image mode is read here
    opened = open_eval_dataset(data['dataset'], data['root'], data['split'], channels,
                               num_samples=data['num_samples'], data_seed=data['data_seed'])
    return data, opened


def evaluate_published(folder: Path, data: Dict[str, Any], dataset: Any, device: str = 'cpu', batch_size: int = 256,
                       workers: int = 2) -> Dict[str, Any]:
    """Top-1/top-5 of the published folder (loaded back as a user would: `local-dir:`, sha256 checked, its own
    preprocessing from config.json) on an opened evaluation split; with the dataset name, split and image count."""
    loaded = load_model(f'local-dir:{folder}')
    data_config = resolve_preprocessing(loaded, data['dataset'], {})
    results = evaluate_dataset(loaded.model.to(device), dataset, data_config, batch_size=batch_size, workers=workers,
                               device=torch.device(device))
    return dict(results, dataset=data['dataset'] or 'folder', split=split_name(data['dataset'], data['split']))


def publish(checkpoint: str, model_name: str, out: str, repo_id: Optional[str] = None,
            results: Optional[str] = None, twin_results: Optional[str] = None, force: bool = False,
            revision: Optional[str] = None, use_ema: Optional[bool] = None, card_template: Optional[str] = None,
            benchmark: bool = True, bench_device: str = 'cpu', card_license: str = 'apache-2.0',
            atol: float = 1e-5, eval_dataset: Optional[str] = None, eval_data_dir: Optional[str] = None,
            workers: int = 2) -> Dict[str, Any]:
    """Export, document, verify and (with ``repo_id``) upload one checkpoint. Returns a summary dict.

    Everything that can be refused is refused before any work: existing files in ``out`` without ``force``, an
    unknown architecture, a missing template or summary, a repo that already holds a model, unreadable or
    non-finite weights, a dataset that cannot be opened. ``use_ema``: None takes the EMA weights when the checkpoint
    has them. ``eval_dataset`` / ``eval_data_dir``: evaluate the verified folder on that evaluation split (on
    ``bench_device``) for the card.
    """
    folder = OutputFolder(out, PUBLISHED_FILES, overwrite=force, command='publish', flag='--force', key='publish')
    folder.check()
    architecture, tag = split_model_name_tag(model_name)
    require_registered(architecture, '--model')
    template = find_card_template(architecture, card_template)
    rows = read_summary(results) if results else []
    twin_rows = read_summary(twin_results) if twin_results else []
    if repo_id:
        check_upload_allowed(repo_id, revision, force)  # fail before the work, not after it
    ckpt = read_checkpoint(checkpoint)
    source, weights = model_from_checkpoint(ckpt, model_name, use_ema=use_ema)  # refuses non-finite weights
    source.eval()
    eval_data = None
    if eval_dataset is not None or eval_data_dir is not None:
        eval_data = open_card_dataset(ckpt, source, eval_dataset, eval_data_dir)

    result = select_result(rows, ckpt.epoch) if rows else None
    if result is not None:
        check_result_matches_checkpoint(result, ckpt, results)
        if ckpt.has_ema and weights != 'state_dict_ema':
            _logger.warning('train.py evaluated the EMA weights, not the non-EMA weights published with --no-ema: '
                            'the card reports their accuracy as not measured.')
            result = None
    twin = select_result(twin_rows, None, like=(result, rows)) if twin_rows else None
    dataset = card_dataset(ckpt.args.get('dataset'), source.num_classes, tag)

    model_config: Dict[str, Any] = {RECORD_KEY: dict(
        timm_posattn_version=_package_version(), source_checkpoint=Path(ckpt.path).name, weights=weights,
        epoch=ckpt.epoch)}
    # what the weights are, not what the source model's default tag was
    model_config['pretrained_cfg'] = dict(num_classes=source.num_classes, license=card_license)
    if tag or dataset.key:
        model_config['pretrained_cfg']['tag'] = tag or dataset.key
    label_names = dataset.label_names or _matching_label_names(source)
    if label_names:
        model_config['label_names'] = list(label_names)
        model_config['pretrained_cfg']['label_names'] = list(label_names)

    # The set is built, verified and documented beside the published files, then switched in whole: a kill at any
    # moment leaves the old set or the new one (outputs.FolderClaim). Nothing else in --out is touched.
    with folder.claim() as claim:
        staging = claim.staging_folder()
        export_folder(source, staging, data_config_from_args(ckpt.args), model_config, ckpt.model_kwargs)
        config = json.loads((staging / 'config.json').read_text())
        config[RECORD_KEY].update(publish_record(config, staging / WEIGHTS_NAME))
        weights_sha256 = config[RECORD_KEY]['weights_sha256']
        claim.stage_text('config.json', json.dumps(config, indent=2))

        diff = verify_folder(staging, source, atol=atol)
        evaluation = None
        if eval_data is not None:  # the folder as written and verified: exactly the weights that are published
            evaluation = evaluate_published(staging, *eval_data, device=bench_device, workers=workers)
        stats = measure_model(source, config['pretrained_cfg']['input_size'], device=bench_device,
                              benchmark=benchmark)
        card = render_model_card(
            template=template, model_name=model_name, config=config, checkpoint=ckpt, weights=weights, stats=stats,
            result=result, twin=twin, dataset=dataset, architecture=describe_architecture(source), repo_id=repo_id,
            card_license=card_license, evaluation=evaluation)
        claim.stage_text('README.md', card)
        built = sorted(p.name for p in staging.iterdir())
        if built != sorted(PUBLISHED_FILES):
            raise RuntimeError(f'publish built {built}, expected exactly {sorted(PUBLISHED_FILES)}')
        claim.commit(PUBLISHED_FILES)

    summary = dict(out=str(folder.path.resolve()), weights=ckpt.describe(weights), max_logit_diff=diff,
                   weights_sha256=weights_sha256, stats=stats, result=result, evaluation=evaluation)
    if tag:  # a releases.json entry for the tag makes pretrained=True build the default architecture
        summary['tag_mismatch'] = tag_rebuilds_model(source, model_name, config['pretrained_cfg']['input_size'],
                                                     atol=atol)
    if repo_id:
        commit = upload_folder(folder.path, repo_id, revision=revision, force=force)
        summary['commit'] = getattr(commit, 'oid', None)
        if not summary.get('tag_mismatch'):
            summary['release_entry'] = release_entry(repo_id, summary['commit'], weights_sha256)
    return summary


def _package_version() -> str:
    from . import __version__
    return __version__


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog='python -m timm_posattn.publish', description=__doc__.split('\n\n')[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='train.py checkpoint (.pth.tar)')
    parser.add_argument('--model', required=True,
                        help='architecture it was trained as, with the tag to publish, '
                             'e.g. vit_posattn_small_patch4_32.cifar10')
    parser.add_argument('--out', required=True,
                        help='folder to write config.json, model.safetensors and README.md into (other files in it '
                             'are never touched)')
    parser.add_argument('--repo-id', default=None, help='upload to this Hugging Face repo (ORG/NAME) after verifying')
    parser.add_argument('--revision', default=None, help='branch to upload to (created if missing); default main')
    parser.add_argument('--results', default=None, help="train.py summary.csv of this run (for the card's numbers)")
    parser.add_argument('--twin-results', default=None,
                        help='summary.csv of the standard-attention twin (pos_attn_blocks=none), same recipe')
    parser.add_argument('--force', '--overwrite', dest='force', action='store_true',
                        help="replace publish's own files in --out and an existing Hub model")
    add_ema_arguments(parser)
    parser.add_argument('--card-template', default=None, help='model card template (default: by model family)')
    parser.add_argument('--license', default='apache-2.0')
    parser.add_argument('--no-benchmark', action='store_true', help='skip the img/s measurement')
    parser.add_argument('--bench-device', type=device_arg, default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--atol', type=float_range(0), default=1e-5,
                        help='max abs logit difference when verifying (>= 0)')
    parser.add_argument('--dataset', default=None, metavar='NAME',
                        help="evaluate the published weights on this dataset's evaluation split for the card, as "
                             "validate.py does (train.py names: torch/fashion_mnist, torch/cifar10, ...; on "
                             "--bench-device)")
    parser.add_argument('--data-dir', default=None, metavar='DIR',
                        help='where --dataset lies (alone: an image folder with a validation/ split)')
    parser.add_argument('-j', '--workers', type=int_range(0), default=2, metavar='N',
                        help='data loading workers for --dataset (default: 2)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Publish (and print what was published); returns publish()'s summary."""
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    args = _parser().parse_args(argv)
    summary = publish(
        args.checkpoint, args.model, args.out, repo_id=args.repo_id, results=args.results,
        twin_results=args.twin_results, force=args.force, revision=args.revision, use_ema=args.use_ema,
        card_template=args.card_template, benchmark=not args.no_benchmark, bench_device=args.bench_device,
        card_license=args.license, atol=args.atol, eval_dataset=args.dataset, eval_data_dir=args.data_dir,
        workers=args.workers)
    evaluation = summary.get('evaluation')
    if evaluation:
        print(f"Evaluated the published weights on {evaluation['dataset']}/{evaluation['split']} "
              f"({evaluation['num_samples']} images): top-1 {evaluation['top1']:.2f}%, top-5 {evaluation['top5']:.2f}%")
    print(f"Published {summary['weights']} to {summary['out']} ({', '.join(PUBLISHED_FILES)}; verified: max "
          f"|logit diff| {summary['max_logit_diff']:.2g}; model.safetensors sha256 {summary['weights_sha256']})")
    if summary.get('tag_mismatch'):
        _logger.warning(f"timm.create_model('{args.model}', pretrained=True) could not load these weights: "
                        f"{summary['tag_mismatch']}. Load them with hf-hub:{args.repo_id or 'ORG/NAME'} or "
                        f"local-dir:{args.out} (config.json records the model kwargs); no releases.json entry is "
                        f"offered for the tag.")
    if 'release_entry' in summary:
        print('Uploaded. To advertise these weights, add this entry to timm_posattn/releases.json:\n'
              + json.dumps(summary['release_entry'], indent=2))
    elif args.repo_id:
        print(f'Uploaded to {args.repo_id}.')
    return summary


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
