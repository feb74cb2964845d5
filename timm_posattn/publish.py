"""Publish a train.py checkpoint as a Hugging Face Hub model folder (and optionally upload it).

    python -m timm_posattn.publish --checkpoint output/train/.../model_best.pth.tar \\
        --model vit_posattn_small_patch4_32 --out hub/vit_posattn_small_patch4_32.cifar10 \\
        --results output/train/.../summary.csv [--repo-id timm-posattn/vit_posattn_small_patch4_32.cifar10]

The folder is timm's own format (``timm.models.save_for_hf``: model.safetensors + config.json) plus a model
card (README.md) rendered from ``model_cards/`` with numbers measured on this checkpoint only. It is written
next to ``--out`` under a temporary name, loaded back with ``timm.create_model('local-dir:...')`` and compared
with the source model's logits; only a verified folder is moved into place and, with ``--repo-id``, uploaded.
"""
import argparse
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import timm
from timm.models import save_for_hf, split_model_name_tag
from timm.models import clean_state_dict

from . import hub
from .machine import cpu_name
from .model_card import (
    DATASETS, _check_result_matches_checkpoint, dataset_info, describe_architecture, find_card_template, read_summary,
    render_model_card, select_result,
)

_logger = logging.getLogger('timm_posattn.publish')

# train.py arguments that shape the model (passed to timm.create_model) and the preprocessing (config.json)
_MODEL_ARG_KEYS = ('num_classes', 'in_chans', 'img_size')
_DATA_ARG_KEYS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_CFG_DATA_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_HUB_FILES = ('config.json', hub.WEIGHTS_NAME, 'pytorch_model.bin')


class VerificationError(RuntimeError):
    """The written folder does not reproduce the source model; nothing is published."""


class RefusedOverwrite(FileExistsError):
    """The destination already holds a model and --force was not given."""


def load_train_checkpoint(path: str, use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Weights and metadata of a train.py checkpoint (EMA weights preferred when present).

    Returns:
        (state_dict, info) where info holds arch, epoch, args (dict), metric and which weights were taken.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(
            f'Could not load {path} with torch.load(weights_only=True): {e}. Expected a train.py checkpoint '
            f"(a dict with 'state_dict', 'arch', 'epoch', 'args' as plain dict).") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f'{path}: expected a checkpoint dict, got {type(ckpt).__name__}.')
    if 'state_dict' not in ckpt and 'state_dict_ema' not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {'state_dict': ckpt}  # a bare state dict, as timm's clean_checkpoint.py writes
        else:
            raise ValueError(f"{path}: no 'state_dict' in checkpoint (keys: {sorted(ckpt)[:10]}).")
    weights = 'state_dict_ema' if use_ema and ckpt.get('state_dict_ema') else 'state_dict'
    args = ckpt.get('args') or {}
    if not isinstance(args, dict):
        raise ValueError(f"{path}: 'args' must be a plain dict (got {type(args).__name__}).")
    info = dict(arch=ckpt.get('arch'), epoch=ckpt.get('epoch'), args=args, metric=ckpt.get('metric'),
                weights=weights, has_ema=bool(ckpt.get('state_dict_ema')), checkpoint=os.path.basename(path))
    return clean_state_dict(ckpt[weights]), info


def source_model_args(args: Dict[str, Any], state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The model kwargs a train.py run used: what `create_model` needs to rebuild it (and config.json's model_args)."""
    kwargs = {k: args[k] for k in _MODEL_ARG_KEYS if args.get(k) is not None}
    if args.get('input_size'):
        kwargs['in_chans'] = args['input_size'][0]
        kwargs['img_size'] = tuple(args['input_size'][1:])
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    kwargs.update(args.get('model_kwargs') or {})
    if 'num_classes' not in kwargs and 'head.weight' in state_dict:
        kwargs['num_classes'] = state_dict['head.weight'].shape[0]
    return kwargs


def build_source_model(model_name: str, state_dict: Dict[str, torch.Tensor], kwargs: Dict[str, Any]) -> torch.nn.Module:
    """Rebuild the trained model with its model kwargs and load the weights strictly."""
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f'Checkpoint weights do not fit {model_name} built with {kwargs}: missing {missing[:5]}, '
            f'unexpected {unexpected[:5]}. Is --model the architecture the checkpoint was trained with?')
    return model.eval()


def data_config_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing train.py used (mean/std/crop/interpolation), for config.json's pretrained_cfg."""
    return {k: args[k] for k in _DATA_ARG_KEYS if args.get(k) not in (None, '')}


def measure_model(model: torch.nn.Module, input_size: Sequence[int], device: str = 'cpu', batch_size: int = 64,
                  min_seconds: float = 1.0, benchmark: bool = True) -> Dict[str, Any]:
    """Params, GMACs (torch.utils.flop_counter, MACs = FLOPs / 2) and inference img/s on this machine.

    vit_posattn models cache their input-independent positional attention in eval mode without grad, so a
    batch's cost per image (``gmacs``) excludes computing it; ``gmacs_uncached`` is one image with the attention
    computed (as in training). Models without such a cache report the same number twice.
    """
    from torch.utils.flop_counter import FlopCounterMode
    stats: Dict[str, Any] = dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    model.eval()
    x = torch.randn(1, *input_size)
    with FlopCounterMode(display=False) as counter:
        model(x)  # grad enabled: no cache, attention computed from the positional encodings
    stats['gmacs_uncached'] = counter.get_total_flops() / 2 / 1e9
    with torch.no_grad():
        model(x)  # fills the cache (if the model has one) outside the counter
        with FlopCounterMode(display=False) as counter:
            model(x)
    stats['gmacs'] = counter.get_total_flops() / 2 / 1e9
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
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in _CFG_DATA_KEYS}
    model_config = dict(model_config, pretrained_cfg={**overrides, **model_config.get('pretrained_cfg', {})})
    extra = {'data_config': data_config} if 'data_config' in inspect.signature(save_for_hf).parameters else {}
    save_for_hf(model, folder, model_config=model_config, model_args=model_args, safe_serialization=True, **extra)


def verify_folder(folder: Path, source: torch.nn.Module, atol: float = 1e-5, seed: int = 0) -> float:
    """Load the folder back like a user would and compare logits with the source model on a fixed batch."""
    loaded = hub.load_model(f'local-dir:{folder}').eval()
    input_size = loaded.pretrained_cfg['input_size']
    if loaded.num_classes != source.num_classes:
        raise VerificationError(f'Loaded model has {loaded.num_classes} classes, source has {source.num_classes}.')
    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (loaded(x) - source(x)).abs().max().item()
    if not diff <= atol:
        raise VerificationError(f'Logits of the folder loaded back differ from the source model by {diff:.3g} '
                                f'(> {atol:g}); nothing was published.')
    return diff


def _matching_label_names(model: torch.nn.Module) -> Optional[Sequence[str]]:
    """Label names of the model's own pretrained cfg, when they fit its classifier."""
    names = model.pretrained_cfg.get('label_names')
    return names if names and len(names) == model.num_classes else None


def _make_shareable(folder: Path) -> None:
    """mkdtemp and safetensors create private files; give the published folder the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Atomically put the verified folder at ``out``; an existing non-empty folder needs ``force``."""
    if out.exists() and not out.is_dir():
        raise RefusedOverwrite(f'{out} exists and is not a folder.')
    if _is_nonempty_dir(out):
        if not force:
            raise RefusedOverwrite(f'{out} is not empty; pass --force to replace it.')
        old = out.with_name(f'.{out.name}.old-{os.getpid()}')
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)


def _hf_api(token: Optional[str] = None):
    from huggingface_hub import HfApi
    return HfApi(token=token, library_name='timm_posattn')


def check_upload_allowed(repo_id: str, revision: Optional[str] = None, force: bool = False, api=None) -> bool:
    """Refuse (RefusedOverwrite) when the repo's branch already holds a model and ``force`` is off.

    Returns whether the branch exists.
    """
    from huggingface_hub.utils import RevisionNotFoundError
    api = api or _hf_api()
    branch = revision or 'main'
    if not api.repo_exists(repo_id):
        return False
    try:
        existing = set(api.list_repo_files(repo_id, revision=branch))
    except RevisionNotFoundError:
        return False
    clash = sorted(existing.intersection(_HUB_FILES))
    if clash and not force:
        raise RefusedOverwrite(
            f'{repo_id}@{branch} already holds {clash}; pass --force to overwrite it, or --revision NEW_BRANCH.')
    return True


def upload_folder(folder: Path, repo_id: str, revision: Optional[str] = None, force: bool = False,
                  private: bool = False, commit_message: Optional[str] = None, token: Optional[str] = None):
    """Upload a verified folder; refuses when the repo (branch) already holds a model and ``force`` is off.

    The token comes from ``token``, else huggingface_hub's usual sources (HF_TOKEN, ``hf auth login``).
    """
    api = _hf_api(token)
    branch = revision or 'main'
    branch_exists = check_upload_allowed(repo_id, revision, force, api)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch != 'main' and not branch_exists:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=branch,
                             commit_message=commit_message or f'Publish {repo_id} with timm_posattn.publish')


def release_entry(repo_id: str, commit: Optional[str], weights_sha256: str) -> Dict[str, Any]:
    """The releases.json entry that makes a tag advertise these weights."""
    return dict(status='published', hf_hub_id=repo_id, revision=commit, sha256=weights_sha256)


def publish(checkpoint: str, model_name: str, out: str, repo_id: Optional[str] = None,
            results: Optional[str] = None, twin_results: Optional[str] = None, force: bool = False,
            revision: Optional[str] = None, use_ema: bool = True, card_template: Optional[str] = None,
            benchmark: bool = True, bench_device: str = 'cpu', card_license: str = 'apache-2.0',
            atol: float = 1e-5) -> Dict[str, Any]:
    """Export, document, verify and (with ``repo_id``) upload one checkpoint. Returns a summary dict."""
    out_path = Path(out).resolve()
    if _is_nonempty_dir(out_path) and not force:
        raise RefusedOverwrite(f'{out_path} is not empty; pass --force to replace it.')
    architecture, tag = split_model_name_tag(model_name)
    hub.require_registered(architecture, '--model')
    if repo_id:
        check_upload_allowed(repo_id, revision, force)  # fail before the work, not after it
    state_dict, info = load_train_checkpoint(checkpoint, use_ema=use_ema)
    if info['arch'] and split_model_name_tag(info['arch'])[0] != architecture:
        raise ValueError(f"Checkpoint was trained as {info['arch']!r}, not {architecture!r} (--model).")
    args = info['args']
    model_args = source_model_args(args, state_dict)
    source = build_source_model(model_name, state_dict, model_args)
    data_config = data_config_from_args(args)

    rows = read_summary(results) if results else []
    result = select_result(rows, info['epoch']) if rows else None
    if result is not None:
        _check_result_matches_checkpoint(result, info, results)
        if info['has_ema'] and info['weights'] != 'state_dict_ema':
            _logger.warning('train.py evaluated the EMA weights, not the non-EMA weights published with --no-ema: '
                            'the card reports their accuracy as not measured.')
            result = None
    twin_rows = read_summary(twin_results) if twin_results else []
    twin = select_result(twin_rows, None, like=(result, rows)) if twin_rows else None

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_path.name}.tmp-', dir=out_path.parent))
    try:
        model_config = {hub.PUBLISH_INFO_KEY: dict(
            timm_posattn_version=_package_version(), source_checkpoint=info['checkpoint'], weights=info['weights'],
            epoch=info['epoch'])}
        dataset = dataset_info(args.get('dataset'), source.num_classes)
        if dataset['key'] not in DATASETS and tag:
            dataset = dataset_info(tag, source.num_classes)  # e.g. an ImageNet folder ('' dataset) published as .in1k
        # what the weights are, not what the source model's default tag was
        model_config['pretrained_cfg'] = dict(num_classes=source.num_classes, license=card_license)
        if tag or dataset['key']:
            model_config['pretrained_cfg']['tag'] = tag or dataset['key']
        label_names = dataset.get('label_names') or _matching_label_names(source)
        if label_names:
            model_config['label_names'] = list(label_names)
            model_config['pretrained_cfg']['label_names'] = list(label_names)
        export_folder(source, tmp, data_config, model_config, model_args)
        config = json.loads((tmp / 'config.json').read_text())
        weights_file = tmp / hub.WEIGHTS_NAME
        weights_sha256 = hub.sha256_file(weights_file)
        config[hub.PUBLISH_INFO_KEY]['weights_sha256'] = weights_sha256
        (tmp / 'config.json').write_text(json.dumps(config, indent=2))

        diff = verify_folder(tmp, source, atol=atol)
        stats = measure_model(source, config['pretrained_cfg']['input_size'], device=bench_device,
                              benchmark=benchmark)
        card = render_model_card(
            template=find_card_template(architecture, card_template), model_name=model_name, config=config,
            info=info, stats=stats, result=result, twin=twin, dataset=dataset,
            architecture=describe_architecture(source), repo_id=repo_id, card_license=card_license)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        _make_shareable(tmp)
        _move_into_place(tmp, out_path, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    summary = dict(out=str(out_path), max_logit_diff=diff, weights_sha256=weights_sha256, stats=stats,
                   result=result)
    if repo_id:
        commit = upload_folder(out_path, repo_id, revision=revision, force=force)
        summary['commit'] = getattr(commit, 'oid', None)
        summary['release_entry'] = release_entry(repo_id, summary['commit'], weights_sha256)
    return summary


def _package_version() -> str:
    from . import __version__
    return __version__


def _parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m timm_posattn.publish', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='train.py checkpoint (.pth.tar)')
    parser.add_argument('--model', required=True,
                        help='architecture it was trained as, with the tag to publish, '
                             'e.g. vit_posattn_small_patch4_32.cifar10')
    parser.add_argument('--out', required=True, help='folder to write (refused if not empty, unless --force)')
    parser.add_argument('--repo-id', default=None, help='upload to this Hugging Face repo (ORG/NAME) after verifying')
    parser.add_argument('--revision', default=None, help='branch to upload to (created if missing); default main')
    parser.add_argument('--results', default=None, help="train.py summary.csv of this run (for the card's numbers)")
    parser.add_argument('--twin-results', default=None,
                        help='summary.csv of the standard-attention twin (pos_attn_layers=none), same recipe')
    parser.add_argument('--force', action='store_true', help='replace an existing folder / hub model')
    parser.add_argument('--no-ema', action='store_true', help='publish state_dict even when EMA weights exist')
    parser.add_argument('--card-template', default=None, help='model card template (default: by model family)')
    parser.add_argument('--license', default='apache-2.0')
    parser.add_argument('--no-benchmark', action='store_true', help='skip the img/s measurement')
    parser.add_argument('--bench-device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--atol', type=float, default=1e-5, help='max abs logit difference when verifying')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = _parse_args(argv)
    try:
        summary = publish(
            args.checkpoint, args.model, args.out, repo_id=args.repo_id, results=args.results,
            twin_results=args.twin_results, force=args.force, revision=args.revision, use_ema=not args.no_ema,
            card_template=args.card_template, benchmark=not args.no_benchmark, bench_device=args.bench_device,
            card_license=args.license, atol=args.atol)
    except (VerificationError, RefusedOverwrite, hub.WeightsFileError, hub.UnknownArchitectureError,
            FileNotFoundError, ValueError) as e:
        _logger.error(f'publish failed: {e}')
        return 1
    _logger.info(f"Wrote and verified {summary['out']} (max |logit diff| {summary['max_logit_diff']:.2g}, "
                 f"model.safetensors sha256 {summary['weights_sha256']})")
    if 'release_entry' in summary:
        _logger.info('Uploaded. To advertise these weights, add this entry to timm_posattn/releases.json:\n'
                     + json.dumps(summary['release_entry'], indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
