"""What publishing records about a model folder, and the checks every loader of it makes.

`python -m timm_posattn.publish` writes timm's Hub format (config.json + model.safetensors) and records, in
config.json's ``timm_posattn`` section, which weights file it wrote and digests that bind the folder together:

* ``weights_file`` / ``weights_sha256``: the weights file and its sha256;
* ``config_sha256``: the sha256 of config.json itself (canonical JSON, without this section): an edit of the
  architecture, ``model_args`` (pooling, activation, biases, loading switches) or ``pretrained_cfg`` (mean, std,
  crop) changes the model or its inputs while the weights still verify, and is caught by it.

Every loader checks them before the weights are used (`verify_folder`, `verify_hub_repo`, and
`verify_pretrained_source` from the model family's ``checkpoint_filter_fn``, so that
``timm.create_model('local-dir:…' / 'hf-hub:…', pretrained=True)`` checks what our loaders do): the weights file
timm will load must be the recorded one (another weights file beside or instead of it is refused, whatever its
name), its digest must match, and so must the config's. Weights are also refused when they hold NaN or inf.

What the digests protect against: corruption, partial downloads or copies, a swapped or edited file. What they
cannot: someone who rewrites the weights and the config together and recomputes the digests. Pinning a Hub revision
(``hf-hub:ORG/NAME@<commit>``) protects against that. This module reads JSON and files only; huggingface_hub is
imported for Hub repos alone (timm itself imports it).
"""
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from .cli import UsageError, one_line

__all__ = [
    'LoadError', 'WeightsFileError', 'NonFiniteWeightsError', 'RECORD_KEY', 'WEIGHTS_NAME', 'check_finite',
    'sha256_file', 'check_safetensors', 'config_digest', 'publish_record', 'weights_file_timm_loads',
    'verify_config', 'verify_folder', 'verify_hub_repo', 'verify_pretrained_source',
]

RECORD_KEY = 'timm_posattn'  # config.json section written by publish (ignored by timm itself)
WEIGHTS_NAME = 'model.safetensors'  # the file timm's hub loaders look for first
# timm.models._hub: local-dir loads the first of these that exists, else the first file by extension priority
_TIMM_PREFERRED_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth',
                         'open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
                         'open_clip_pytorch_model.bin', 'open_clip_pytorch_model.pth')
_TIMM_EXT_PRIORITY = ('.safetensors', '.pth', '.pth.tar', '.bin')
_SHA256_RE = re.compile(r'[0-9a-f]{64}')


class LoadError(UsageError):
    """A model or checkpoint could not be loaded for a reason the user can fix; the message is one line."""


class WeightsFileError(LoadError):
    """A weights file is missing, truncated, corrupted, not the recorded one, or does not match its checksum."""


class NonFiniteWeightsError(LoadError):
    """Weights hold NaN or inf: any result computed from them would be meaningless."""


def check_finite(tensors: Union[nn.Module, Mapping[str, torch.Tensor]], origin: str) -> None:
    """Refuse weights that hold NaN or inf, naming the first such tensor."""
    items = tensors.state_dict().items() if isinstance(tensors, nn.Module) else tensors.items()
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != 'meta' \
                and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteWeightsError(f'{origin}: {name} holds {bad} non-finite value(s) (NaN or inf) of '
                                        f'{value.numel()}; results from these weights would be meaningless')


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in chunks (weights can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def check_safetensors(path: Union[str, Path], expected_sha256: Optional[str] = None) -> None:
    """Check a .safetensors file's structure with the safetensors library (truncation, trailing bytes, a damaged
    header) and, when a checksum was recorded, its sha256 (which also catches flipped bits inside tensor data)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f'{path}: weights file not found (expected a {WEIGHTS_NAME} file)')
    try:
        with safe_open(str(path), framework='pt'):
            pass
    except SafetensorError as e:
        raise WeightsFileError(f'{path}: damaged or incomplete safetensors file ({one_line(e)}); '
                               f'download or publish it again') from None
    if expected_sha256:
        actual = sha256_file(path)
        if actual != expected_sha256.lower():
            raise WeightsFileError(f'{path}: sha256 {actual} does not match the recorded {expected_sha256}: the '
                                   f'file is not the one that was published; download or publish it again')


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a config.json's content without publish's own section (canonical JSON: sorted keys)."""
    body = {k: v for k, v in config.items() if k != RECORD_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def publish_record(config: Mapping[str, Any], weights_path: Union[str, Path]) -> Dict[str, str]:
    """The digests publish adds to config.json's section for the weights file it wrote."""
    return dict(weights_file=Path(weights_path).name, weights_sha256=sha256_file(weights_path),
                config_sha256=config_digest(config))


def _record(config: Mapping[str, Any], origin: str) -> Dict[str, Any]:
    """Publish's section of a config (empty when the folder was not written by publish), its fields checked."""
    record = config.get(RECORD_KEY)
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise LoadError(f"{origin}: '{RECORD_KEY}' must be a mapping (written by timm_posattn.publish), got "
                        f"{type(record).__name__}")
    for key in ('weights_sha256', 'config_sha256'):
        value = record.get(key)
        if value is not None and not (isinstance(value, str) and _SHA256_RE.fullmatch(value.lower())):
            raise LoadError(f"{origin}: '{RECORD_KEY}.{key}' must be a sha256 (64 hex digits), got {value!r}")
    name = record.get('weights_file', WEIGHTS_NAME if record.get('weights_sha256') else None)
    if name is not None and (not isinstance(name, str) or os.path.basename(name) != name or not name):
        raise LoadError(f"{origin}: '{RECORD_KEY}.weights_file' must be a file name, got {name!r}")
    return dict(record, weights_file=name)


def verify_config(config: Mapping[str, Any], origin: str) -> Dict[str, Any]:
    """Check a published config against its own recorded digest; returns publish's record (empty: none)."""
    record = _record(config, origin)
    expected = record.get('config_sha256')
    if expected and config_digest(config) != expected.lower():
        raise WeightsFileError(f'{origin} was changed after publishing (its content no longer matches the recorded '
                               f'config_sha256): the model or preprocessing it describes is not the published one; '
                               f'download or publish it again')
    return record


def weights_file_timm_loads(folder: Union[str, Path]) -> Optional[Path]:
    """The file `timm.create_model('local-dir:FOLDER', pretrained=True)` loads (timm's own order); None if none."""
    folder = Path(folder)
    for name in _TIMM_PREFERRED_FILES:
        if (folder / name).exists():
            return folder / name
    for ext in _TIMM_EXT_PRIORITY:
        files = sorted(folder.glob(f'*{ext}'))
        if files:
            return files[0]
    return None


def _read_config(path: Path, origin: str) -> Dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoadError(f'{origin} is not valid JSON: {one_line(e)}') from None
    if not isinstance(config, dict):
        raise LoadError(f'{origin} must hold a JSON mapping, got {type(config).__name__}')
    return config


def verify_folder(folder: Union[str, Path], check_digest: bool = True) -> Dict[str, Any]:
    """Check a published folder as it will be loaded; returns publish's record (empty: the folder records nothing,
    as timm's own save_for_hf folders). ``check_digest=False`` leaves the weights' sha256 to the load itself."""
    folder = Path(folder)
    origin = f'{folder / "config.json"}'
    record = verify_config(_read_config(folder / 'config.json', origin), origin)
    name = record.get('weights_file')
    if not name:
        return record
    loaded = weights_file_timm_loads(folder)
    if loaded is None or loaded.name != name:
        found = f'timm would load {loaded.name} instead' if loaded is not None else 'no weights file is there'
        raise WeightsFileError(f"{folder}: the published weights file {name} is missing and {found}, which is not "
                               f"the one that was published; download or publish it again")
    _check_weights_file(loaded, record.get('weights_sha256') if check_digest else None)
    return record


def _check_weights_file(path: Path, expected_sha256: Optional[str]) -> None:
    if path.suffix == '.safetensors':
        check_safetensors(path, expected_sha256)
    elif expected_sha256 and sha256_file(path) != expected_sha256.lower():
        raise WeightsFileError(f'{path}: sha256 does not match the recorded {expected_sha256}: the file is not the '
                               f'one that was published; download or publish it again')


def _hub_file(repo: str, filename: str, cache_dir: Optional[Union[str, Path]] = None) -> Optional[str]:
    """One file of a Hub repo (from the local cache when it is there); None when the repo does not have it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    repo_id, _, revision = repo.partition('@')  # timm's 'org/repo@revision' form
    try:
        return hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir,
                               library_name='timm_posattn')
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: caught first)
        raise LoadError(f"hf-hub:{repo}: {filename} is not in the local Hugging Face cache and the Hub cannot be "
                        f"reached (offline, HF_HUB_OFFLINE=1, or no network)") from None
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise LoadError(f"hf-hub:{repo}: could not get {filename}: {one_line(e)[:200]}") from None


def _blob_sha256(cached_path: str) -> Optional[str]:
    """Hugging Face caches LFS files as `blobs/<sha256>`: that name is a checksum we get for free."""
    name = os.path.basename(os.path.realpath(cached_path))
    return name if _SHA256_RE.fullmatch(name) else None


def verify_hub_repo(repo: str, cache_dir: Optional[Union[str, Path]] = None,
                    expected_sha256: Optional[str] = None, filename: str = WEIGHTS_NAME) -> Dict[str, Any]:
    """Check a Hub repo's published config and the weights timm loads from it (a safetensors file: its recorded
    digest, else ``expected_sha256``, else the cache's blob name). Returns publish's record."""
    record: Dict[str, Any] = {}
    config_file = _hub_file(repo, 'config.json', cache_dir) if expected_sha256 is None else None
    if config_file is not None:
        origin = f'hf-hub:{repo} config.json'
        record = verify_config(_read_config(Path(config_file), origin), origin)
        filename = record.get('weights_file') or filename
    if not filename.endswith('.safetensors'):
        return record
    weights = _hub_file(repo, filename, cache_dir)
    if weights is None:
        if record.get('weights_file'):
            raise WeightsFileError(f'hf-hub:{repo}: the published weights file {filename} is missing from the repo')
        return record
    check_safetensors(weights, record.get('weights_sha256') or expected_sha256 or _blob_sha256(weights))
    return record


def verify_pretrained_source(pretrained_cfg: Optional[Mapping[str, Any]]) -> None:
    """Check the published folder or Hub repo a model's pretrained weights were just loaded from (what timm's own
    `create_model('local-dir:…' / 'hf-hub:…', pretrained=True)` skips); other sources have nothing recorded."""
    cfg = pretrained_cfg or {}
    source = cfg.get('source')
    if source == 'local-dir' and cfg.get('file'):
        verify_folder(cfg['file'])
    elif source == 'hf-hub' and cfg.get('hf_hub_id'):
        verify_hub_repo(cfg['hf_hub_id'])
