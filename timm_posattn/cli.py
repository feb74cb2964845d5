"""One error policy for every command (train.py, validate.py, `python -m timm_posattn.*`).

An error the user can fix is one line on stderr, ``error: <what was wrong, what was expected>``, and exit code 2; a
traceback only for real bugs, or for anything with ``--debug``. Ctrl-C prints what the command had saved and exits
with 130. Numeric options are checked when parsed (`int_range`, `float_range`), with the accepted range in the
message, and an explicit value is used or refused, never replaced.
"""
import argparse
import errno
import logging
import math
import sys
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence

from timm.utils import ParseKwargs as _TimmParseKwargs

__all__ = [
    'UsageError', 'ArgumentParser', 'ParseKwargs', 'device_arg', 'int_range', 'float_range', 'one_line', 'run_command',
    'EXIT_USAGE', 'EXIT_INTERRUPTED',
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# file-system errors that are the user's to fix (a full disk, a read-only folder, permissions), not bugs
_USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG)


class UsageError(ValueError):
    """Something the user can fix (a value, a path, a file): printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the package's error policy: a bad option is one line (no usage dump) and exit code 2.

    Adds ``--debug`` (show tracebacks) to every command.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument('--debug', action='store_true', default=False,
                          help='show the full traceback of an error (default: one line)')

    def error(self, message: str) -> NoReturn:
        print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class ParseKwargs(_TimmParseKwargs):
    """timm's `key=value` option parser (`--model-kwargs depth=1 global_pool=avg`), with a one-line error for an
    item that has no `=` (or no keyword name before it) instead of a traceback."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        bad = [value for value in values if value and ('=' not in value or not value.split('=', 1)[0].isidentifier())]
        if bad:
            parser.error(f'argument {option_string}: expected key=value items, got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


def _number(kind: type, text: Any) -> Any:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}')
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f'expected {"an integer" if kind is int else "a number"}, got {text!r}')
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
    if kind is int and isinstance(text, float) and text != value:
        raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}')
    return value


def _range_text(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return 'a finite number'


def _ranged(kind: type, low: Optional[float], high: Optional[float], low_open: bool, high_open: bool
            ) -> Callable[[Any], Any]:
    accepted = _range_text(low, high, low_open, high_open)

    def parse(text: Any) -> Any:
        value = _number(kind, text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f'{value:g} is out of range: expected {accepted}')
        return value
    parse.__name__ = f'{kind.__name__} {accepted}'  # argparse names the type in its messages
    return parse


def int_range(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[Any], int]:
    """argparse type: an integer in [low, high] (None: unbounded)."""
    return _ranged(int, low, high, False, False)


def float_range(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False) -> Callable[[Any], float]:
    """argparse type: a finite float in [low, high] (open ends with low_open/high_open; None: unbounded)."""
    return _ranged(float, low, high, low_open, high_open)


def device_arg(text: str) -> str:
    """argparse type: a torch device this machine has (cpu, cuda, cuda:N, ...)."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f'expected a device such as cpu, cuda or cuda:0, got {text!r}') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f'{text}: CUDA is not available on this machine')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f'{text}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    return text


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type when it has none), for a one-line error that quotes it."""
    text = ' '.join(str(error).split())  # one line, whatever the exception's message looked like
    return text or type(error).__name__


def run_command(
        main: Callable[[], Any],
        argv: Optional[Sequence[str]] = None,
        user_errors: Sequence[type] = (),
        on_interrupt: Optional[Callable[[], str]] = None,
        exit_codes: Optional[Mapping[type, int]] = None,
) -> int:
    """Run a command's ``main()`` under the error policy; returns the exit code. Every command's ``run(argv)`` is
    this around its ``main(argv)``.

    ``user_errors``: exception types (besides `UsageError`) that mean bad input: one line, exit 2. ``exit_codes``:
    other exception types that end the command with one line and their own exit code (train.py: a non-finite loss,
    3). ``on_interrupt`` says what was saved when Ctrl-C stops the command. argparse's own exits (``--help``, a bad
    option already printed as one line) return their code. ``--debug`` anywhere in ``argv`` re-raises instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = '--debug' in argv
    exit_codes = dict(exit_codes or {})
    try:
        main()
    except SystemExit as e:  # argparse: --help (0), or a bad option already printed as one line (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except tuple(exit_codes) as e:
        if debug:
            raise
        for handler in logging.getLogger().handlers:
            handler.flush()
        print(f'error: {one_line(e)}', file=sys.stderr)
        return next(code for kind, code in exit_codes.items() if isinstance(e, kind))
    except (UsageError, OSError, *user_errors) as e:
        if debug or (isinstance(e, OSError) and not isinstance(e, user_errors) and e.errno not in _USER_OS_ERRORS):
            raise
        for handler in logging.getLogger().handlers:  # earlier log lines first (not shutdown: callers may go on)
            handler.flush()
        if isinstance(e, OSError) and e.errno in _USER_OS_ERRORS:
            where = f" '{e.filename}'" if e.filename else ''
            print(f'error: could not write or read{where}: {e.strerror} (a full disk, a read-only folder or '
                  f'permissions)', file=sys.stderr)
        else:
            print(f'error: {one_line(e)}', file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        saved = on_interrupt() if on_interrupt is not None else ''
        print(f'interrupted{": " + saved if saved else ""}', file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
