"""The error policy as a test assertion, shared by the tests of the commands (tests/ is on sys.path under pytest)."""


def assert_one_line_error(code, err, *expected):
    """Exit code 2 and exactly one line on stderr, `error: ...`, no traceback, naming each of `expected`."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'Traceback' not in err
    for text in expected:
        assert text in lines[0], lines[0]
