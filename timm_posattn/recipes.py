"""Recipes (``train.py -c FILE``): a YAML file of command-line arguments, with the command line's own checks.

A recipe is read as defaults for the command's parser, so each of its values passes exactly the checks the same
option gets on the command line (`cli.int_range`, `float_range`, choices, the number of values), and an unknown key,
a key given twice or a malformed file is one line (`cli.UsageError`).
"""
import argparse
import os
from typing import Any, Dict

import yaml

from .cli import ParseKwargs, UsageError

__all__ = ['read_recipe']


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f'key {key!r} is given twice',
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, 'problem_mark', None)
    problem = getattr(error, 'problem', None) or str(error)
    return f'{problem} at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else problem


def read_recipe(path: str, parser: argparse.ArgumentParser, command: str = 'train.py') -> Dict[str, Any]:
    """Read a YAML recipe for ``parser``: each key must be one of its arguments (dashes as underscores) and each
    value pass that option's checks (type, range, choices, count), so that a typo, a key given twice or an
    out-of-range value cannot silently do something else. Returns the values by argument name; ``command``
    names the command in messages."""
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' not found")
    try:
        with open(path, encoding='utf-8') as f:
            cfg = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise UsageError(f"config file '{path}' is not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"config file '{path}' could not be read: {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UsageError(f"config file '{path}' must be a mapping of {command} arguments, got {type(cfg).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config', 'debug')}
    unknown = sorted(str(k) for k in cfg if str(k).replace('-', '_') not in actions)
    if unknown:
        raise UsageError(f"config file '{path}' has keys that are not {command} arguments: {', '.join(unknown)}")
    return {key.replace('-', '_'): _config_value(f"config file '{path}': {key}", actions[key.replace('-', '_')], value)
            for key, value in cfg.items()}


def _config_value(where: str, action: argparse.Action, value: Any) -> Any:
    """A YAML value with the checks the command line applies to the same option: type, range, choices, count."""
    if value is None and action.default is None:
        return None
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
            raise UsageError(f'{where}: expected a mapping of keyword arguments, got {value!r}')
        return value
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise UsageError(f'{where}: expected true or false, got {value!r}')
        return value
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        count = f'{action.nargs} values' if isinstance(action.nargs, int) else 'a list'
        if not isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs) or (
                action.nargs == '+' and not value):
            raise UsageError(f'{where}: expected {count}, got {value!r}')
        return [_config_scalar(where, action, v) for v in value]
    return _config_scalar(where, action, value)


def _config_scalar(where: str, action: argparse.Action, value: Any) -> Any:
    if action.type in (None, str):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UsageError(f'{where}: expected a string, got {value!r}')
        value = str(value)
    else:
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise UsageError(f'{where}: {e}') from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f'{where}: {value!r} is not one of {", ".join(map(repr, action.choices))}')
    return value
