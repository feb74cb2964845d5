"""The release list: which pretrained tags are published on the Hugging Face Hub.

The model registry asks this module for the hub location of each tag, so a tag only advertises weights
(and shows up in ``timm.list_pretrained``) once ``releases.json`` marks it ``published``. A ``trained`` tag has
weights in a verified folder (``folder``, with their ``sha256`` and the ``upload`` command) that are not on the Hub
yet: it advertises nothing either.
"""
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

RELEASES_FILE = Path(__file__).with_name('releases.json')
STATUSES = ('published', 'trained', 'planned')


def _check_entry(name: str, entry: Any) -> None:
    """Reject entries that would advertise weights without saying where they are."""
    if not isinstance(entry, dict) or entry.get('status') not in STATUSES:
        raise ValueError(f'{RELEASES_FILE}: entry {name!r} needs a status in {STATUSES}, got {entry!r}.')
    if '.' not in name:
        raise ValueError(f"{RELEASES_FILE}: entry {name!r} must be a pretrained tag 'architecture.tag'.")
    if entry['status'] == 'published' and '/' not in (entry.get('hf_hub_id') or ''):
        raise ValueError(f"{RELEASES_FILE}: published entry {name!r} needs an hf_hub_id 'org/repo'.")
    missing = [k for k in ('folder', 'sha256', 'upload') if not entry.get(k)]
    if entry['status'] == 'trained' and missing:
        raise ValueError(f"{RELEASES_FILE}: trained entry {name!r} needs {', '.join(missing)} (where the verified "
                         f"folder is, its weights' sha256, and the command that uploads it).")


@lru_cache(maxsize=None)
def load_releases() -> Dict[str, Dict[str, Any]]:
    """All tags of the release list, published or planned, keyed by ``arch.tag``."""
    with open(RELEASES_FILE, encoding='utf-8') as f:
        releases = json.load(f)['releases']
    for name, entry in releases.items():
        _check_entry(name, entry)
    return releases


def published_tags() -> List[str]:
    """Tags whose weights are on the Hub, sorted."""
    return sorted(name for name, entry in load_releases().items() if entry['status'] == 'published')


def hub_cfg(name: str) -> Dict[str, Any]:
    """``hf_hub_id`` (``org/repo[@revision]``) for a published tag, else an empty dict (no weights advertised)."""
    entry = load_releases().get(name)
    if not entry or entry.get('status') != 'published':
        return {}
    hub_id = entry['hf_hub_id']
    if entry.get('revision'):
        hub_id = f"{hub_id}@{entry['revision']}"  # timm's hf_split() reads the revision after '@'
    return {'hf_hub_id': hub_id}
