"""The release list: which pretrained tags are published on the Hugging Face Hub.

The model registry asks this module for the hub location of each tag, so a tag only advertises weights
(and shows up in ``timm.list_pretrained``) once ``releases.json`` marks it ``published``.
"""
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict

RELEASES_FILE = Path(__file__).with_name('releases.json')


@lru_cache(maxsize=None)
def load_releases() -> Dict[str, Dict[str, Any]]:
    """All tags of the release list, published or planned, keyed by ``arch.tag``."""
    with open(RELEASES_FILE, encoding='utf-8') as f:
        return json.load(f)['releases']


def hub_cfg(name: str) -> Dict[str, Any]:
    """``hf_hub_id`` (``org/repo[@revision]``) for a published tag, else an empty dict (no weights advertised)."""
    entry = load_releases().get(name)
    if not entry or entry.get('status') != 'published':
        return {}
    hub_id = entry['hf_hub_id']
    if entry.get('revision'):
        hub_id = f"{hub_id}@{entry['revision']}"  # timm's hf_split() reads the revision after '@'
    return {'hf_hub_id': hub_id}
