"""docs/architecture.md's layering is a contract: import-linter checks the rules pyproject.toml states."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    # in a subprocess: import-linter configures logging with dictConfig, which disables every existing logger
    code = ('import sys; from importlinter.cli import lint_imports; '
            f'sys.exit(lint_imports(config_filename={str(ROOT / "pyproject.toml")!r}, no_cache=True, no_logo=True))')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_architecture_doc_names_every_module():
    """The map stays true: every module of the package is placed in docs/architecture.md."""
    doc = (ROOT / 'docs' / 'architecture.md').read_text(encoding='utf-8')
    modules = sorted(p.stem for p in (ROOT / 'timm_posattn').glob('*.py') if p.stem != '__init__')
    missing = [m for m in modules if f'`{m}`' not in doc]
    assert not missing, f'modules missing from docs/architecture.md: {missing}'


def test_only_the_loading_module_unpickles():
    """One loading path: `torch.load` (always weights_only=True) is called in timm_posattn/loading.py and nowhere else
    in the package or the scripts, so every command gets its checks (format, checksums, finite weights)."""
    import ast
    sources = sorted((ROOT / 'timm_posattn').glob('*.py')) + [ROOT / 'train.py', ROOT / 'validate.py']
    sources += sorted((ROOT / 'benchmarks').glob('*.py'))
    callers = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'load'
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == 'torch'):
                callers.append(f'{path.relative_to(ROOT)}:{node.lineno}')
    assert callers and all(c.startswith('timm_posattn/loading.py:') for c in callers), callers
