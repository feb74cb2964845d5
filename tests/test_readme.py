"""README.md's two commands are the project's contract: CI must run exactly the README's test command."""
import re
from pathlib import Path

import timm

import timm_posattn  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r'```bash\n(.*?)```', text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    main_job, test_command = (block.strip() for block in _bash_blocks(readme)[:2])
    assert main_job.endswith('train.py') and 'pip install -e .' in main_job
    assert test_command.endswith('-m pytest -q')
    ci_lines = [line.strip() for line in (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()]
    assert test_command in ci_lines


def test_readme_model_table_lists_every_registered_model():
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    for name in timm.list_models('vit_posattn*'):
        assert f'`{name}`' in readme, f'{name} missing from the README model table'
