"""One loading path: the train.py checkpoint format, and every way a command gets a model.

Everything that reads weights goes through here: train.py (`--resume`, `--initial-checkpoint`, the distillation
teacher), validate.py, visualize, publish, convert and export. This module owns

  * the train.py checkpoint format (`make_checkpoint` writes it, `read_checkpoint` reads it): the architecture, the
    model kwargs and data arguments of the run, plain and EMA weights, the epoch, the metric it was ranked by and the
    run it belongs to;
  * which weights a checkpoint stands for (`TrainCheckpoint.weights`): the EMA weights when the run kept them,
    because those are what it evaluated and ranked;
  * `load_model(source)`: a registered name (`name.tag` with `pretrained=True`), a train.py checkpoint or weights
    file, `hf-hub:ORG/REPO[@rev]`, `local-dir:DIR` or a folder, as a `LoadedModel` (the model and which weights it
    holds). A published folder's config.json is checked before anything is built and its digests when the weights
    are loaded (`timm_posattn.published`); a missing `import timm_posattn` (or other plugin) is named; non-finite
    weights are refused. `model_from_checkpoint` rebuilds the model of a checkpoint already read.

Every error a user can fix is a `LoadError` with a one-line message; the model's refusal of a kwarg is turned into
one in one place (`_create`).
"""
import argparse
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import timm
from timm.models import clean_state_dict, is_model, parse_model_name, resolve_pretrained_cfg, split_model_name_tag

from .cli import one_line
from .outputs import finish_interrupted_commits
from .published import (
    WEIGHTS_NAME, LoadError, WeightsFileError, check_finite, check_safetensors, verify_config, verify_folder,
    verify_hub_repo, weights_file_timm_loads,
)
from .vit_posattn import VisionTransformerPosAttn, checkpoint_filter_fn, rename_deprecated_kwargs

__all__ = [
    'LoadError', 'TrainCheckpoint', 'LoadedModel', 'load_model', 'model_from_checkpoint', 'read_checkpoint',
    'make_checkpoint', 'load_weights', 'add_ema_arguments', 'parse_source', 'require_registered', 'set_preprocessing',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2  # timm's convention: version >= 2 stores the epoch that was completed
_CHECKPOINT_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.tar', '.bin', '.ckpt', '.safetensors')  # never a model name


class UnknownArchitectureError(LoadError):
    """The architecture named by a model folder / repo / name / checkpoint is not registered with timm."""


# --------------------------------------------------------------------------------------------------------------------
# The train.py checkpoint format


def _plain(value: Any) -> Any:
    """Plain Python values only, so checkpoints load with torch.load(weights_only=True)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def plain_args(args: Union[argparse.Namespace, Mapping[str, Any]]) -> Dict[str, Any]:
    """A run's arguments as checkpoints store them (plain values; train.py's args.yaml holds the same dict)."""
    return _plain(dict(vars(args) if isinstance(args, argparse.Namespace) else args))


def make_checkpoint(
        arch: str,
        epoch: int,
        state_dict: Dict[str, torch.Tensor],
        args: Optional[Mapping[str, Any]] = None,
        state_dict_ema: Optional[Dict[str, torch.Tensor]] = None,
        metric: Optional[float] = None,
        run_id: Optional[str] = None,
        **extra: Any,
) -> Dict[str, Any]:
    """The dict train.py saves (and `read_checkpoint` reads): timm's checkpoint layout with `args` as a plain dict.

    `run_id` names the run the checkpoint belongs to (`timm_posattn.run_folder`); `extra` carries training state
    (optimizer, AMP scaler, saver history) under timm's key names.
    """
    checkpoint = {'epoch': epoch, 'arch': arch, 'state_dict': state_dict, 'version': CHECKPOINT_VERSION}
    if run_id is not None:
        checkpoint['run_id'] = run_id
    if args is not None:
        checkpoint['args'] = plain_args(args)
    if state_dict_ema is not None:
        checkpoint['state_dict_ema'] = state_dict_ema
    if metric is not None:
        checkpoint['metric'] = metric
    checkpoint.update(extra)
    return checkpoint


def write_checkpoint(checkpoint: Mapping[str, Any], f: IO[bytes]) -> None:
    """Write a checkpoint (`make_checkpoint`) to an open file: serialized in memory first, so that a full disk fails
    as the OSError it is (torch's zip writer reports it as an 'unexpected pos' RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    f.write(buffer.getbuffer())


@dataclass
class TrainCheckpoint:
    """What a checkpoint file holds, read once."""
    path: str
    state_dict: Dict[str, torch.Tensor]
    state_dict_ema: Optional[Dict[str, torch.Tensor]] = None
    arch: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    metric: Optional[float] = None
    run_id: Optional[str] = None  # the train.py run it belongs to (None: written before run ids, or not by train.py)
    raw: Dict[str, Any] = field(default_factory=dict)  # everything else (optimizer, saver, scaler state)

    @property
    def has_ema(self) -> bool:
        return bool(self.state_dict_ema)

    @property
    def model_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments that rebuild the model the weights belong to (see `checkpoint_model_kwargs`)."""
        return checkpoint_model_kwargs(self.args, self.state_dict)

    def weights(self, use_ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], str]:
        """(state dict, 'state_dict' or 'state_dict_ema'), cleaned of DDP/compile prefixes.

        use_ema: None takes the EMA weights when the checkpoint has them (the run evaluated and ranked those), True
        requires them, False takes the plain weights.
        """
        if use_ema and not self.has_ema:
            raise LoadError(f"{self.path}: --use-ema asked for EMA weights, but the checkpoint has none "
                            f"(it was trained without --model-ema)")
        key = 'state_dict_ema' if (use_ema is None and self.has_ema) or use_ema else 'state_dict'
        return clean_state_dict(getattr(self, key)), key

    def describe(self, which: str) -> str:
        """Which weights of this checkpoint a command used, for people: 'the EMA weights (state_dict_ema) of ...'."""
        if which == 'state_dict_ema':
            what = 'the EMA weights (state_dict_ema)'
        elif self.has_ema:
            what = 'the plain weights (state_dict; the run ranked its EMA weights)'
        else:
            what = 'the weights (state_dict; no EMA weights in the checkpoint)'
        return f"{what} of {self.path}" + (f', epoch {self.epoch}' if self.epoch is not None else '')


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """`--use-ema` / `--no-ema` (dest `use_ema`): which weights of a train.py checkpoint a command takes.

    Neither: the EMA weights when the checkpoint has them (what the run evaluated and ranked), else the plain ones.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--use-ema', dest='use_ema', action='store_const', const=True, default=None,
                       help="require the checkpoint's EMA weights (default: EMA weights when present)")
    group.add_argument('--no-ema', dest='use_ema', action='store_const', const=False,
                       help="take the checkpoint's plain (non-EMA) weights")


def _torch_load(path: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True; timm's own checkpoints may store argparse.Namespace args (allowed).

    mmap needs the zip format: other files (legacy torch.save, or not a checkpoint at all) are read without it, so
    that the error says what is wrong with the file rather than with mmap."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or 'mmap can only be used' not in str(e):
                raise
        return torch.load(path, map_location='cpu', weights_only=True)


def read_checkpoint(path: Union[str, Path], mmap: bool = False) -> TrainCheckpoint:
    """Read a train.py checkpoint, a timm checkpoint, a bare state dict or a .safetensors file, without unpickling
    anything but tensors and plain values. Raises `WeightsFileError` (one line) for anything else."""
    path = str(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"checkpoint '{path}' not found" + (' (it is a folder: use local-dir:)'
                                                                   if os.path.isdir(path) else ''))
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"checkpoint '{path}' is empty (0 bytes): its save was interrupted or it was never "
                               f"written")
    finish_interrupted_commits(os.path.dirname(os.path.abspath(path)))  # a set killed while switching in: complete it
    if path.endswith('.safetensors'):
        check_safetensors(path)
        from safetensors.torch import load_file
        return TrainCheckpoint(path=path, state_dict=load_file(path))
    try:
        ckpt = _torch_load(path, mmap=mmap)
    except Exception as e:
        detail = one_line(e).split('. ')[0][:200]  # torch's first sentence
        raise WeightsFileError(f"could not read checkpoint '{path}' (truncated, damaged or not a PyTorch "
                               f"checkpoint; loaded with weights_only=True): {detail}") from None
    if not isinstance(ckpt, dict):
        raise WeightsFileError(f"'{path}' holds a {type(ckpt).__name__}, expected a checkpoint dict or a state dict")
    if 'state_dict' not in ckpt and 'state_dict_ema' not in ckpt:
        if ckpt.get('model') is not None and isinstance(ckpt['model'], dict):
            ckpt = dict(ckpt, state_dict=ckpt['model'])  # DeiT-style {'model': state_dict}
        elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {'state_dict': ckpt}  # a bare state dict
        else:
            raise WeightsFileError(f"'{path}' has no weights: expected 'state_dict' (train.py / timm) or a state "
                                   f"dict, found keys {sorted(ckpt)[:8]}")
    args = ckpt.get('args') or {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise WeightsFileError(f"'{path}': 'args' must be a dict of training arguments, got {type(args).__name__}")
    state_dict = ckpt.get('state_dict') or ckpt.get('state_dict_ema')
    known = ('state_dict', 'state_dict_ema', 'arch', 'args', 'epoch', 'metric', 'model', 'run_id')
    run_id = ckpt.get('run_id')
    return TrainCheckpoint(
        path=path, state_dict=state_dict, state_dict_ema=ckpt.get('state_dict_ema'), arch=ckpt.get('arch'),
        args=args, epoch=ckpt.get('epoch'), metric=ckpt.get('metric'),
        run_id=run_id if isinstance(run_id, str) else None,
        raw={k: v for k, v in ckpt.items() if k not in known})


def checkpoint_model_kwargs(args: Mapping[str, Any], state_dict: Optional[Mapping[str, torch.Tensor]] = None
                            ) -> Dict[str, Any]:
    """The `create_model` kwargs a train.py run used (its --model-kwargs, classes, channels, size, pooling)."""
    kwargs: Dict[str, Any] = {}
    for key in ('num_classes', 'in_chans', 'img_size'):
        if args.get(key) is not None:
            kwargs[key] = args[key]
    if args.get('input_size'):
        kwargs['in_chans'] = args['input_size'][0]
        kwargs['img_size'] = tuple(args['input_size'][1:])
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    kwargs.update(rename_deprecated_kwargs(args.get('model_kwargs') or {}, 'the recorded --model-kwargs'))
    if state_dict is not None:
        if 'num_classes' not in kwargs and 'head.weight' in state_dict:
            kwargs['num_classes'] = int(state_dict['head.weight'].shape[0])
        if 'pos_attn_layer' not in kwargs:  # the weights say which layer, whatever the default was when trained
            from .layers import infer_pos_attn_layer
            layer = infer_pos_attn_layer(state_dict)
            if layer is not None:
                kwargs['pos_attn_layer'] = layer
    return kwargs


def same_kwarg_value(a: Any, b: Any) -> bool:
    """Whether two model kwarg values are the same, lists and tuples alike (YAML and checkpoints store tuples as
    lists)."""
    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value
    return plain(a) == plain(b)


# --------------------------------------------------------------------------------------------------------------------
# Checks


def read_model_config(folder: Union[str, Path]) -> Dict[str, Any]:
    """Parse `config.json` of a timm model folder, with errors naming the folder and the missing field."""
    cfg_file = Path(folder) / 'config.json'
    if not cfg_file.is_file():
        raise LoadError(f'{cfg_file} not found: expected a timm model folder (config.json + {WEIGHTS_NAME}) as '
                        f'written by `python -m timm_posattn.publish` or timm.models.save_for_hf')
    try:
        cfg = json.loads(cfg_file.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f'{cfg_file} is not valid JSON: {e}') from None
    if not isinstance(cfg, dict) or 'architecture' not in cfg:
        raise LoadError(f"{cfg_file} has no 'architecture' field; it is not a timm model config")
    return cfg


def _package_version() -> str:
    from . import __version__
    return __version__


def require_registered(architecture: str, origin: str) -> None:
    """Raise an error that tells the user which import registers `architecture`."""
    if is_model(architecture):
        return
    if architecture.startswith('vit_posattn'):
        detail = (f'`import timm_posattn` registers the vit_posattn_* models, but the installed timm_posattn '
                  f'({_package_version()}) does not define this one; upgrade timm_posattn')
    else:
        detail = ('run `import timm_posattn` before timm.create_model() for vit_posattn_* models; models of other '
                  'timm plugins need their package imported the same way')
    raise UnknownArchitectureError(
        f'unknown model architecture {architecture!r} (from {origin}): timm has no such model registered; {detail}')


def _safetensors_shapes(path: Optional[Union[str, Path]]) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Tensor names and shapes from a safetensors header (no tensor data is read); None for other files."""
    if path is None or not str(path).endswith('.safetensors'):
        return None
    from safetensors import safe_open
    check_safetensors(path)
    with safe_open(str(path), framework='pt') as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_size(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_int, value)))


def _pair(value: Any) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# create_model arguments that choose how weights are loaded, not what the model is: never in a published config
_LOADING_SWITCHES = ('pretrained', 'pretrained_strict', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path',
                     'cache_dir', 'features_only')


def check_model_config(cfg: Mapping[str, Any], origin: str,
                       shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> None:
    """Refuse, in one line and before anything is allocated, a model folder's config.json whose fields are not what
    timm reads, or whose sizes cannot be those of the weights (``shapes``, read from the weights file's header)."""
    def bad(field: str, value: Any, expected: str) -> LoadError:
        return LoadError(f'{origin}: {field} must be {expected}, got {value!r}'[:400])
    if not isinstance(cfg.get('architecture'), str) or not cfg['architecture']:
        raise bad("'architecture'", cfg.get('architecture'), 'a model name')
    for key in ('model_args', 'pretrained_cfg'):
        if key in cfg and not isinstance(cfg[key], dict):  # null too: timm updates it as a dict
            raise bad(f"'{key}'", cfg[key], 'a mapping')
    args = cfg.get('model_args') or {}
    for key in args:
        if not (isinstance(key, str) and key.isidentifier()):
            raise bad('a model_args key', key, 'an argument name')
        if key in _LOADING_SWITCHES:
            raise LoadError(f'{origin}: model_args holds {key!r}, which decides how weights are loaded, not what the '
                            f'model is; a published config never does: remove it, or download the folder again')
    pcfg = cfg.get('pretrained_cfg') or {}
    for key in ('mean', 'std'):
        value = pcfg.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and 1 <= len(value) <= 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (key == 'mean' or v > 0) for v in value)):
            raise bad(f'pretrained_cfg.{key}', value,
                      f'a list of 1 to 4 finite numbers{" > 0" if key == "std" else ""}')
    size = pcfg.get('input_size')
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 3 and all(map(_is_int, size))):
        raise bad('pretrained_cfg.input_size', size, '[channels, height, width] of positive integers')
    crop = pcfg.get('crop_pct')
    if crop is not None and not (isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 4):
        raise bad('pretrained_cfg.crop_pct', crop, 'a number in (0, 4]')
    for key in ('interpolation', 'crop_mode'):
        if pcfg.get(key) is not None and not isinstance(pcfg[key], str):
            raise bad(f'pretrained_cfg.{key}', pcfg[key], 'a string')
    classes = cfg.get('num_classes', pcfg.get('num_classes'))
    if classes is not None and not _is_int(classes, 0):
        raise bad('num_classes', classes, 'an integer >= 0')
    for key in ('depth', 'embed_dim', 'num_heads', 'in_chans'):
        if key in args and not _is_int(args[key]):
            raise bad(f'model_args.{key}', args[key], 'a positive integer')
    for key in ('img_size', 'patch_size'):
        if key in args and args[key] is not None and not _is_size(args[key]):
            raise bad(f'model_args.{key}', args[key], 'a positive integer or [height, width]')
    if shapes:
        _check_sizes_against_weights(args, shapes, origin)


def _check_sizes_against_weights(args: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]], origin: str) -> None:
    """The sizes a ViT config gives must be those of its weights (a depth of 10**9 is refused here, not built)."""
    blocks = {int(m.group(1)) for name in shapes for m in [re.match(r'blocks\.(\d+)\.', name)] if m}
    if 'depth' in args and blocks and args['depth'] != max(blocks) + 1:
        raise LoadError(f"{origin}: model_args.depth is {args['depth']}, but the weights hold {max(blocks) + 1} "
                        f"blocks")
    width = next((shapes[k][-1] for k in ('cls_token', 'pos_embed') if k in shapes and shapes[k]), None)
    if 'embed_dim' in args and width is not None and args['embed_dim'] != width:
        raise LoadError(f"{origin}: model_args.embed_dim is {args['embed_dim']}, but the weights are {width} wide")
    tokens = shapes.get('pos_embed', (0, 0))[1] if len(shapes.get('pos_embed', ())) == 3 else None
    kernel = shapes.get('patch_embed.proj.weight', ())
    patch = args.get('patch_size') or (tuple(kernel[-2:]) if len(kernel) == 4 else None)
    if tokens and args.get('img_size') is not None and patch is not None and not args.get('dynamic_img_size'):
        (h, w), (ph, pw) = _pair(args['img_size']), _pair(patch)
        if (h // ph) * (w // pw) > tokens:
            raise LoadError(f"{origin}: model_args img_size {args['img_size']} with {ph}x{pw} patches "
                            f"gives {(h // ph) * (w // pw)} patches, but the weights' position table has {tokens} "
                            f"positions")


def _check_built_model_fits(name: str, shapes: Mapping[str, Tuple[int, ...]], origin: str) -> None:
    """Build the model config.json describes on the meta device (nothing allocated) and require that every tensor of
    the weights file fits it, name and shape, as timm's strict load will."""
    try:
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as e:
        raise LoadError(f'{origin} describes a model that cannot be built: {one_line(e)[:300]}') from None
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(ours) - set(shapes)), sorted(set(shapes) - set(ours))
    wrong = [f'{k} {list(shapes[k])} vs {list(ours[k])}' for k in sorted(set(ours) & set(shapes))
             if ours[k] != shapes[k]]
    if missing or extra or wrong:
        detail = '; '.join(part for part in (missing and f'missing {missing[:3]}', extra and f'not in the model '
                                             f'{extra[:3]}', wrong and f'shape {wrong[0]}') if part)
        raise LoadError(f'{origin} describes a model that does not fit the weights ({detail}): the config or the '
                        f'weights were changed; download or publish the folder again')


def _check_local_dir(folder: str) -> None:
    """Before timm reads anything of it: the config's fields, publish's record, the weights file timm will load
    (the recorded one), and the model the config builds against the weights' shapes. The weights' digest is checked
    where they are loaded (`checkpoint_filter_fn`)."""
    finish_interrupted_commits(folder)  # a publish killed while switching its files in: complete it first
    cfg = read_model_config(folder)
    origin = f'{folder}/config.json'
    check_model_config(cfg, origin)
    require_registered(cfg['architecture'], origin)
    verify_folder(folder, check_digest=False)
    weights = weights_file_timm_loads(folder)
    if weights is not None and not str(weights).endswith('.safetensors'):
        read_checkpoint(weights, mmap=True)  # what timm's torch.load would refuse with a traceback, refused in one line
    shapes = _safetensors_shapes(weights)
    if shapes is not None:
        check_model_config(cfg, origin, shapes)
        _check_built_model_fits(f'local-dir:{folder}', shapes, origin)


def _check_hf_hub(hub_id: str, cache_dir) -> None:
    from .published import _hub_file
    cfg_file = _hub_file(hub_id, 'config.json', cache_dir)
    if cfg_file is None:
        raise LoadError(f'Hugging Face repo {hub_id!r} has no config.json; it is not a timm model repo')
    cfg = read_model_config(Path(cfg_file).parent)
    origin = f'hf-hub:{hub_id} config.json'
    check_model_config(cfg, origin)
    require_registered(cfg['architecture'], origin)
    verify_hub_repo(hub_id, cache_dir)
    weights = _hub_file(hub_id, verify_config(cfg, origin).get('weights_file') or WEIGHTS_NAME, cache_dir)
    shapes = _safetensors_shapes(weights)
    if shapes is not None:
        check_model_config(cfg, origin, shapes)
        _check_built_model_fits(f'hf-hub:{hub_id}', shapes, origin)


def _check_registered_name(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> None:
    architecture, tag = split_model_name_tag(name)
    require_registered(architecture, f'model name {name!r}')
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(architecture, kwargs.get('pretrained_cfg') or tag or None,
                                 kwargs.get('pretrained_cfg_overlay'))
    if cfg is None or cfg.state_dict is not None:
        return
    if cfg.file:
        if str(cfg.file).endswith('.safetensors'):
            check_safetensors(cfg.file)
    elif cfg.hf_hub_id:
        from .releases import load_releases
        release = load_releases().get(f'{architecture}.{tag}' if tag else architecture) or {}
        verify_hub_repo(cfg.hf_hub_id, kwargs.get('cache_dir'), expected_sha256=release.get('sha256'),
                        filename=cfg.hf_hub_filename or WEIGHTS_NAME)


def parse_source(source: Union[str, Path]) -> Tuple[Optional[str], str]:
    """(kind, id): kind 'local-dir', 'hf-hub', 'file' or None (a registered name), as `load_model` reads `source`."""
    name = str(source)
    if ':' not in name and name.endswith(_CHECKPOINT_SUFFIXES):
        return 'file', name  # missing or not, a checkpoint path: read_checkpoint says what is wrong with it
    if isinstance(source, Path) or (':' not in name and os.path.exists(name)):
        if os.path.isfile(name):
            return 'file', name
        if not is_model(split_model_name_tag(name)[0]):  # a registered model name wins over a folder of that name
            return 'local-dir', name
    try:
        return parse_model_name(name)
    except ValueError as e:
        if ':' not in name and not os.path.exists(name):  # a path (timm names have no '/' or '\\')
            raise LoadError(f"'{name}' not found: expected a model name, an existing checkpoint file or folder, "
                            f"hf-hub:ORG/REPO or local-dir:FOLDER") from None
        raise LoadError(one_line(e)) from None


class ModelKwargsError(LoadError):
    """The model refuses some of the kwargs it was given (an unknown name, a value out of its range)."""

    def __init__(self, message: str, refused: List[str], reason: str) -> None:
        super().__init__(message)
        self.refused, self.reason = refused, reason


# create_model arguments that say where weights come from, not what the model is (left out of the kwargs probe)
_SOURCE_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir')


def _fails(name: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether the model cannot be built with ``kwargs``; on the meta device, so a probe costs little."""
    try:
        with torch.device('meta'):
            timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # a probe: whatever stops the build
        return True
    return False


def _refused_kwargs(name: str, kwargs: Mapping[str, Any]) -> List[str]:
    """The kwargs a failed build is to blame on: those that fail alone, else all of them together; none when the
    model fails without any (the kwargs are not the reason)."""
    model_kwargs = {k: v for k, v in kwargs.items() if k not in _SOURCE_KWARGS}
    if not model_kwargs or _fails(name, {}):
        return []
    alone = [k for k, v in model_kwargs.items() if _fails(name, {k: v})]
    return alone or list(model_kwargs)


def _create(name: str, origin: str, **kwargs: Any) -> nn.Module:
    """timm.create_model, with the errors a user can fix turned into one line: the one place where a model's refusal
    of a kwarg (an unknown name, a value it refuses) is named (`ModelKwargsError`), and where a pretrained tag without
    weights or weights that do not load are said so."""
    try:
        return timm.create_model(name, **kwargs)
    except LoadError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        if isinstance(e, RuntimeError):
            if type(e).__name__ == 'SafetensorError' or 'Error(s) in loading state_dict' in str(e):
                raise WeightsFileError(f'loading the weights of {name} ({origin}) failed: '
                                       f'{one_line(e)[:300]}') from None
            if 'No pretrained weights exist' in str(e) or 'Invalid pretrained tag' in str(e):
                raise LoadError(f'{name}: {one_line(e)}') from None
        refused = _refused_kwargs(name, kwargs)
        if refused:
            reason = one_line(e)
            given = ', '.join(f'{k}={kwargs[k]!r}' for k in refused)
            raise ModelKwargsError(f'{name} ({origin}) refuses {given}: {reason}', refused, reason) from None
        if isinstance(e, RuntimeError):
            raise
        raise LoadError(f'could not build {name} ({origin}) with {kwargs or "its defaults"}: '
                        f'{one_line(e)}') from None


def load_weights(model: nn.Module, checkpoint: Union[str, TrainCheckpoint], use_ema: Optional[bool] = None,
                 adapt: bool = False) -> str:
    """Load a checkpoint's weights into `model`; returns which weights ('state_dict' or 'state_dict_ema').

    Strict: every key must fit. With `adapt`, the model family's `checkpoint_filter_fn` first converts what it can
    (another resolution, another positional attention layer, a standard ViT's attention: logged).
    """
    ckpt = checkpoint if isinstance(checkpoint, TrainCheckpoint) else read_checkpoint(checkpoint)
    state_dict, which = ckpt.weights(use_ema)
    check_finite(state_dict, ckpt.path)
    if adapt:
        if isinstance(model, VisionTransformerPosAttn):
            try:
                state_dict = checkpoint_filter_fn(state_dict, model)
            except ValueError as e:
                raise LoadError(f'{ckpt.path}: {one_line(e)}') from None
    try:
        incompatible = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shapes that do not fit (strict=False still refuses those)
        mismatches = [line.strip() for line in str(e).splitlines() if 'size mismatch' in line]
        if not mismatches:
            raise
        raise LoadError(f"{ckpt.path} does not fit {type(model).__name__}: {mismatches[0]}"
                        f"{f' (and {len(mismatches) - 1} more)' if len(mismatches) > 1 else ''} (is it another "
                        f"architecture, width or number of classes?)") from None
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise LoadError(
            f"{ckpt.path} does not fit {type(model).__name__}: missing {incompatible.missing_keys[:4]}, unexpected "
            f"{incompatible.unexpected_keys[:4]} (is it another architecture, depth or positional attention layer?)")
    return which


# the pretrained_cfg keys that say how a model's inputs are prepared (timm's data config)
PREPROCESSING_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
# the train.py / validate.py arguments that give them (recorded in a checkpoint's args)
PREPROCESSING_ARGS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_RECORDED_PREPROCESSING = tuple(k for k in PREPROCESSING_KEYS if k != 'input_size')  # the size is the model's


def set_preprocessing(model: nn.Module, data_config: Mapping[str, Any]) -> None:
    """Make ``model.pretrained_cfg`` report the preprocessing its weights are trained with.

    timm reads the normalization of a model from its pretrained cfg (`resolve_data_config`, the distillation
    teacher's and student's mean/std in `timm.task`), but a model built by name carries its default tag's cfg, not
    the one of the run that trained it (e.g. the structured data's mean/std).
    """
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()
              if k in PREPROCESSING_KEYS and v not in (None, '')}
    cfg = {**(getattr(model, 'pretrained_cfg', None) or {}), **values}
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's alias of pretrained_cfg


def _training_preprocessing(ckpt: TrainCheckpoint, model: nn.Module) -> Dict[str, Any]:
    """The normalization and crop a train.py (or timm train.py) run used: its recorded values over the model's
    defaults, resolved as train.py resolved them (`timm.data.resolve_data_config`)."""
    from timm.data import resolve_data_config
    recorded = {k: ckpt.args.get(k) for k in _RECORDED_PREPROCESSING}
    input_size = ckpt.args.get('input_size')
    recorded['in_chans'] = input_size[0] if input_size else ckpt.args.get('in_chans')
    data_config = resolve_data_config(recorded, model=model)
    return {k: data_config[k] for k in _RECORDED_PREPROCESSING if k in data_config}


def model_from_checkpoint(ckpt: TrainCheckpoint, name: Optional[str] = None, use_ema: Optional[bool] = None,
                          adapt: bool = False, **kwargs: Any) -> Tuple[nn.Module, str]:
    """Rebuild the model a checkpoint belongs to and load its weights; returns (model, which weights).

    `name` defaults to the checkpoint's `arch`; its recorded model kwargs are applied, then `kwargs` (explicit values
    win). A checkpoint recorded for another architecture than `name` is refused. The model's pretrained cfg reports
    the normalization and crop the checkpoint's run trained with (`set_preprocessing`).
    """
    arch = split_model_name_tag(ckpt.arch)[0] if ckpt.arch else None
    if name is None:
        if arch is None:
            raise LoadError(f'{ckpt.path} does not record its architecture (safetensors or plain weights): give the '
                            f'model name as well')
        name = ckpt.arch
    elif arch is not None and split_model_name_tag(name)[0] != arch and not adapt:
        raise LoadError(f'{ckpt.path} was trained as {arch!r}, not {split_model_name_tag(name)[0]!r}')
    require_registered(split_model_name_tag(name)[0], ckpt.path)
    model_kwargs = {**(ckpt.model_kwargs if arch is None or split_model_name_tag(name)[0] == arch else {}), **kwargs}
    model = _create(name, ckpt.path, pretrained=False, **model_kwargs)
    which = load_weights(model, ckpt, use_ema=use_ema, adapt=adapt)
    if ckpt.args:
        set_preprocessing(model, _training_preprocessing(ckpt, model))
    return model, which


@dataclass
class LoadedModel:
    """A model a command was pointed at, and what its weights are."""
    model: nn.Module
    weights: str  # for people: 'the EMA weights (state_dict_ema) of RUN/last.pth.tar, epoch 29', ...
    checkpoint: Optional[TrainCheckpoint] = None  # the train.py / timm checkpoint the weights came from
    published: bool = False  # weights that carry their preprocessing in their pretrained cfg (hub, folder, tag)
    trained: bool = True  # False: freshly initialized (a registered name without pretrained or checkpoint)


def load_model(
        source: Optional[Union[str, Path]] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        pretrained: Optional[bool] = None,
        use_ema: Optional[bool] = None,
        **kwargs: Any,
) -> LoadedModel:
    """Any model a command is pointed at, weights verified, and what they are; `timm.create_model` underneath.

    Args:
        source: a registered name (`vit_posattn_small_patch4_32.cifar10`), `hf-hub:ORG/REPO[@rev]`, `local-dir:DIR`,
            a folder, or a checkpoint / weights file (train.py checkpoints record their architecture); may be left
            out when `checkpoint` records its architecture.
        checkpoint: weights for a registered name (a train.py checkpoint, timm checkpoint or .safetensors file).
        pretrained: load the source's own weights; default True for folders and hub repos (what they are for),
            False for registered names (as in timm).
        use_ema: for train.py checkpoints: None the EMA weights when present, True require them, False plain.
        **kwargs: model kwargs (num_classes, img_size, ...), over those a checkpoint records.

    Returns a `LoadedModel`: the model (`.model`) and which weights it holds (`.weights`, what commands print). An
    explicit choice that does not apply is refused: `use_ema` without a train.py checkpoint, `pretrained=True` with
    one.
    """
    if source is None:
        if checkpoint is None:
            raise LoadError('no model given: expected a model name, a folder or hub repo, or a checkpoint')
        source, checkpoint = checkpoint, None
        kind, model_id = 'file', str(source)
    else:
        kind, model_id = parse_source(source)
    if kind == 'file' or checkpoint is not None:
        if pretrained:
            raise LoadError('pretrained (--pretrained) loads the published weights of a model name, and a checkpoint '
                            'gives other weights: pass one of them')
        if kind == 'file' and checkpoint is not None:
            raise LoadError(f"'{source}' is itself a checkpoint: pass the model name with checkpoint=, not both files")
        if kind not in (None, 'file'):
            raise LoadError(f'{kind}:{model_id} brings its own weights: do not pass a checkpoint as well')
        ckpt = read_checkpoint(model_id if kind == 'file' else checkpoint)
        model, which = model_from_checkpoint(ckpt, None if kind == 'file' else model_id, use_ema=use_ema,
                                             **kwargs)
        return LoadedModel(model, ckpt.describe(which), checkpoint=ckpt)
    if use_ema is not None:
        raise LoadError(f'use_ema (--use-ema / --no-ema) chooses the weights of a train.py checkpoint, and {source} '
                        f'is not one')
    if pretrained is None:
        pretrained = kind is not None
    if kind == 'local-dir':
        _check_local_dir(model_id)
        name = f'local-dir:{model_id}'
    elif kind == 'hf-hub':
        _check_hf_hub(model_id, kwargs.get('cache_dir'))
        name = f'hf-hub:{model_id}'
    else:
        _check_registered_name(model_id, pretrained, kwargs)
        name = model_id
    model = _create(name, name, pretrained=pretrained, **kwargs)
    if not pretrained:
        return LoadedModel(model, f'the freshly initialized weights of {name}', trained=False)
    check_finite(model, name)
    return LoadedModel(model, f'the {"published" if kind else "pretrained"} weights of {name}', published=True)
