"""Loading published timm_posattn weights back, with errors that say what went wrong.

``timm.create_model`` already loads ``hf-hub:ORG/REPO``, ``local-dir:DIR`` and registered tags with
``pretrained=True``. Two failures are confusing there: a folder whose architecture timm does not know
("Unknown model (vit_posattn_...)" says nothing about the missing import) and a damaged weights file
(safetensors reports a raw header error). :func:`load_model` checks both before handing over to timm.
"""
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
from torch import nn
from timm.models import is_model, parse_model_name, resolve_pretrained_cfg, split_model_name_tag

__all__ = [
    'WEIGHTS_NAME', 'WeightsFileError', 'UnknownArchitectureError', 'sha256_file', 'validate_safetensors',
    'read_model_config', 'require_registered', 'load_model',
]

WEIGHTS_NAME = 'model.safetensors'  # the file timm's hub loaders look for first
PUBLISH_INFO_KEY = 'timm_posattn'  # config.json section written by publish (ignored by timm itself)

_SAFETENSORS_ITEM_SIZE = {
    'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2, 'F16': 2, 'BF16': 2,
    'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8,
}
_MAX_HEADER_BYTES = 100_000_000  # same bound the safetensors library enforces
_SHA256_RE = re.compile(r'[0-9a-f]{64}')


class WeightsFileError(ValueError):
    """A weights file is missing, truncated, corrupted or does not match its recorded checksum."""


class UnknownArchitectureError(RuntimeError):
    """The architecture named by a model folder / repo / name is not registered with timm."""


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in chunks (weights can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _bad(path: Path, problem: str) -> WeightsFileError:
    return WeightsFileError(
        f'{path}: {problem}. The weights file is damaged or incomplete; delete it and download / publish it again.')


def validate_safetensors(path: Union[str, Path], expected_sha256: Optional[str] = None) -> Dict[str, Any]:
    """Check a .safetensors file's structure (and optionally its sha256) without loading any tensor.

    Catches truncation, trailing garbage, a damaged header and overlapping / out of range tensors, which
    the safetensors library reports as bare header errors or not at all. Bit flips inside tensor data are
    only caught through ``expected_sha256``.

    Returns:
        dict(num_tensors, num_bytes, metadata) of the header.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f'{path}: weights file not found (expected a {WEIGHTS_NAME} file).')
    file_size = path.stat().st_size
    if file_size < 8:
        raise _bad(path, f'only {file_size} bytes, too short to hold a safetensors header')
    with open(path, 'rb') as f:
        (header_len,) = struct.unpack('<Q', f.read(8))
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise _bad(path, f'header claims {header_len} bytes but the file has {file_size - 8} after the length '
                             f'field (truncated or not a safetensors file)')
        try:
            header = json.loads(f.read(header_len).decode('utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(path, f'header is not valid JSON ({e})') from None
    if not isinstance(header, dict):
        raise _bad(path, 'header is not a JSON object')
    metadata = header.pop('__metadata__', None) or {}
    data_size = file_size - 8 - header_len
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info['dtype'], info['shape'], info['data_offsets']
            num_items = 1
            for dim in shape:
                num_items *= int(dim)
            expected = num_items * _SAFETENSORS_ITEM_SIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f'header entry for tensor {name!r} is malformed: {info!r}') from None
        if not 0 <= begin <= end or end - begin != expected:
            raise _bad(path, f'tensor {name!r} ({dtype}{list(shape)}) has data offsets [{begin}, {end}), '
                             f'expected a span of {expected} bytes')
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise _bad(path, f'tensor data of {name!r} starts at byte {begin}, expected {position} '
                             f'(overlapping or missing tensor data)')
        position = end
    if position != data_size:
        what = 'truncated' if position > data_size else 'has trailing bytes'
        raise _bad(path, f'{what}: the header describes {position} bytes of tensor data, the file holds {data_size}')
    if expected_sha256:
        actual = sha256_file(path)
        if actual != expected_sha256.lower():
            raise _bad(path, f'sha256 {actual} does not match the recorded {expected_sha256}')
    return dict(num_tensors=len(spans), num_bytes=file_size, metadata=metadata)


def read_model_config(folder: Union[str, Path]) -> Dict[str, Any]:
    """Parse ``config.json`` of a timm model folder, with errors naming the folder and the missing field."""
    cfg_file = Path(folder) / 'config.json'
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f'{cfg_file} not found: expected a timm model folder (config.json + {WEIGHTS_NAME}) '
            f'as written by `python -m timm_posattn.publish` or timm.models.save_for_hf.')
    try:
        cfg = json.loads(cfg_file.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise ValueError(f'{cfg_file} is not valid JSON: {e}') from None
    if not isinstance(cfg, dict) or 'architecture' not in cfg:
        raise ValueError(f"{cfg_file} has no 'architecture' field; it is not a timm model config.")
    return cfg


def require_registered(architecture: str, origin: str) -> None:
    """Raise an error that tells the user which import registers ``architecture``."""
    if is_model(architecture):
        return
    if architecture.startswith('vit_posattn'):
        detail = (f'`import timm_posattn` registers the vit_posattn_* models, but the installed timm_posattn '
                  f'({_package_version()}) does not define this one; upgrade timm_posattn.')
    else:
        detail = ('Run `import timm_posattn` before timm.create_model() for vit_posattn_* models; models of other '
                  'timm plugins need their package imported the same way.')
    raise UnknownArchitectureError(
        f'Unknown model architecture {architecture!r} (from {origin}): timm has no such model registered. {detail}')


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version('timm_posattn')
    except Exception:
        return 'unknown version'


def _recorded_sha256(cfg: Dict[str, Any]) -> Optional[str]:
    return (cfg.get(PUBLISH_INFO_KEY) or {}).get('weights_sha256')


def _blob_sha256(cached_path: str) -> Optional[str]:
    """Hugging Face caches LFS files as ``blobs/<sha256>``: that name is a checksum we get for free."""
    name = os.path.basename(os.path.realpath(cached_path))
    return name if _SHA256_RE.fullmatch(name) else None


def _hf_download(hub_id: str, filename: str, cache_dir: Optional[Union[str, Path]]) -> Optional[str]:
    """Download (or find in the cache) one file of a hub repo; None when the repo does not have it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError
    repo_id, _, revision = hub_id.partition('@')  # timm's 'org/repo@revision' form
    try:
        return hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir,
                               library_name='timm', library_version=timm.__version__)
    except EntryNotFoundError:
        return None


def _check_hub_weights(hub_id: str, expected_sha256: Optional[str], cache_dir, filename: str = WEIGHTS_NAME) -> None:
    weights = _hf_download(hub_id, filename, cache_dir) if filename.endswith('.safetensors') else None
    if weights is not None:
        validate_safetensors(weights, expected_sha256 or _blob_sha256(weights))


def _check_local_dir(folder: str) -> None:
    cfg = read_model_config(folder)
    require_registered(cfg['architecture'], f'{folder}/config.json')
    weights = Path(folder) / WEIGHTS_NAME
    if weights.exists():
        validate_safetensors(weights, _recorded_sha256(cfg))


def _check_hf_hub(hub_id: str, cache_dir) -> None:
    cfg_file = _hf_download(hub_id, 'config.json', cache_dir)
    if cfg_file is None:
        raise FileNotFoundError(f'Hugging Face repo {hub_id!r} has no config.json; it is not a timm model repo.')
    cfg = read_model_config(Path(cfg_file).parent)
    require_registered(cfg['architecture'], f'hf-hub:{hub_id} config.json')
    _check_hub_weights(hub_id, _recorded_sha256(cfg), cache_dir)


def _check_registered_name(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> None:
    architecture, tag = split_model_name_tag(name)
    require_registered(architecture, f'model name {name!r}')
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(architecture, kwargs.get('pretrained_cfg') or tag or None,
                                 kwargs.get('pretrained_cfg_overlay'))
    if cfg.state_dict is not None:
        return
    if cfg.file:
        if str(cfg.file).endswith('.safetensors'):
            validate_safetensors(cfg.file)
    elif cfg.hf_hub_id:
        from .releases import load_releases
        release = load_releases().get(f'{architecture}.{tag}' if tag else architecture) or {}
        _check_hub_weights(cfg.hf_hub_id, release.get('sha256'), kwargs.get('cache_dir'),
                           filename=cfg.hf_hub_filename or WEIGHTS_NAME)


def _with_source(name_or_path: Union[str, Path]) -> Tuple[Optional[str], str]:
    """Accept a bare folder path as well as timm's ``local-dir:`` / ``hf-hub:`` names."""
    name = str(name_or_path)
    if isinstance(name_or_path, Path):
        return 'local-dir', name
    if os.path.isdir(name) and ':' not in name and not is_model(split_model_name_tag(name)[0]):
        return 'local-dir', name  # a registered model name wins over a folder of the same name
    return parse_model_name(name)


def load_model(name_or_path: Union[str, Path], pretrained: Optional[bool] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with clear errors for unregistered architectures and damaged weight files.

    Args:
        name_or_path: a registered name (``vit_posattn_small_patch4_32.cifar10``), ``hf-hub:ORG/REPO[@rev]``,
            ``local-dir:DIR`` or a plain folder path.
        pretrained: load weights; defaults to True for folders and hub repos (what they are for), False for
            registered names (as in timm).
        **kwargs: passed to ``timm.create_model`` (num_classes, pretrained_cfg_overlay, cache_dir, ...).
    """
    source, model_id = _with_source(name_or_path)
    if pretrained is None:
        pretrained = source is not None
    if source == 'local-dir':
        _check_local_dir(model_id)
        name = f'local-dir:{model_id}'
    elif source == 'hf-hub':
        _check_hf_hub(model_id, kwargs.get('cache_dir'))
        name = f'hf-hub:{model_id}'
    else:
        _check_registered_name(model_id, pretrained, kwargs)
        name = model_id
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if type(e).__name__ == 'SafetensorError':  # a damage the structural check could not see
            raise WeightsFileError(f'Loading weights for {name!r} failed: {e}') from e
        raise
