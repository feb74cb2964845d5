"""The error policy of train.py and `python -m timm_posattn.paper`: a value the user can fix is refused with one
line on stderr and exit code 2, before anything is built where it can be; an explicit value is used, never replaced.

Most cases run the commands' entry points in-process (`train.run`, `paper.run`: what `__main__` calls), with model
building made to fail loudly so that a check that comes too late shows up; a few run the real command lines in
subprocesses (started together, as interpreter start-up dominates them).
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from cli_assertions import assert_one_line_error  # noqa: E402
from timm_posattn import paper  # noqa: E402

TINY = ['--model-kwargs', 'depth=1', 'embed_dim=24', 'num_heads=2', '-j', '0', '--log-interval', '100']
SMALL_DATA = ['--train-num-samples', '64', '--val-num-samples', '32', '-b', '32']


def call(entry, argv, capsys):
    """Run a command's entry point in-process; returns (exit code, stdout, stderr)."""
    try:
        code = entry([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors exit from inside the parser
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------------------------
# train.py


@pytest.mark.parametrize('argv, expected', [
    (['-b', '0'], 'expected >= 1'),
    (['-vb', '0'], 'expected >= 1'),
    (['--epochs', '0'], 'expected >= 1'),
    (['--lr', '0'], 'expected (0, 3.40282e+38]'),
    (['--lr', '-1'], 'expected (0, 3.40282e+38]'),
    (['--lr', 'nan'], 'finite'),
    (['--lr', '1e39'], 'expected (0, 3.40282e+38]'),  # beyond float32: optimizers would crash on it
    (['--lr-base', '0'], 'expected (0, 3.40282e+38]'),
    (['--warmup-lr', '-0.00001'], 'expected [0, 3.40282e+38]'),
    (['--min-lr', '-1'], 'expected [0, 3.40282e+38]'),
    (['--min-lr', '1e39'], 'expected [0, 3.40282e+38]'),
    (['--weight-decay', '-0.1'], 'expected >= 0'),
    (['--drop', '1'], 'expected [0, 1)'),
    (['--drop-path', '1.5'], 'expected [0, 1)'),
    (['--smoothing', '1'], 'expected [0, 1)'),
    (['--mixup', '-1'], 'expected >= 0'),
    (['--cutmix', '-0.5'], 'expected >= 0'),
    (['--mixup-prob', '1.5'], 'expected [0, 1]'),
    (['--hflip', '2'], 'expected [0, 1]'),
    (['--reprob', '-0.1'], 'expected [0, 1]'),
    (['-j', '-1'], 'expected >= 0'),
    (['--grad-accum-steps', '0'], 'expected >= 1'),
    (['--checkpoint-hist', '0'], 'expected >= 1'),
    (['--train-num-samples', '0'], 'expected >= 1'),
    (['--val-num-samples', '0'], 'expected >= 1'),
    (['--model-ema-decay', '1.5'], 'expected [0, 1]'),
    (['--seed', '-1'], 'expected [0,'),
    (['--num-classes', '0'], 'expected >= 1'),
    (['--epochs', '2.5'], 'expected an integer'),
    (['--scale', '0.5'], 'expected 2 arguments'),
    (['--sched', 'cosin'], 'invalid choice'),
    (['--interpolation', 'bicubik'], 'invalid choice'),
    (['--lr-base-scale', 'sqr'], 'invalid choice'),
    (['--model-kwargs', 'depth'], 'expected key=value'),
    (['--model', 'vit_posattn_nonexistent'], "unknown model architecture 'vit_posattn_nonexistent'"),
    (['--opt', 'adamww'], '--opt adamww: unknown optimizer'),
    (['--device', 'gpu0'], "expected a device such as cpu, cuda or cuda:0, got 'gpu0'"),
    (['--lr', '1e-3', '--lr-base', '1e-3'], '--lr and --lr-base both given on the command line'),
    (['--eval-metric', 'top1', '--val-split', ''], '--eval-metric top1 needs evaluation'),
    (['--start-epoch', '3', '--epochs', '2'], '--start-epoch 3 leaves nothing to train'),
    (['--aug-repeats', '3'], 'needs distributed training'),
    (['--dataset', 'torch/cifar10', '--data-dir', '{tmp}', '--train-num-samples', '10'], 'has a fixed size'),
    (['--val-split', '', '--val-num-samples', '10'], 'there is no evaluation'),
    (['--train-num-samples', '16'], 'fewer than one batch (-b 64)'),
    (['--num-classes', '1'], '--num-classes 1 is fewer than the 2 classes of the data'),
    (['--class-map', '{tmp}/classes.txt'], "dataset 'structured' has fixed labels"),
    (['--in-chans', '1'], 'the structured images are RGB: expected 3 input channels, got 1'),
    (['--input-size', '3', '32', '32', '--img-size', '64'], 'do not add --img-size'),
    (['--mean', '0.5', '0.5'], '--mean has 2 values: expected 1 or one per input channel (3)'),
    (['--aa', 'rand-m9-mstd0.5'], '--aa would have no effect: training augmentation is off'),
    (['--sched', 'plateau'], 'add --no-sched-on-updates'),
    (['--torchcompile', 'inductr'], '--torchcompile inductr: unknown backend'),
    (['--pretrained', '--initial-checkpoint', '{tmp}/w.pth'], 'both give the starting weights'),
    (['--device-modules', 'no_such_module_here'], "No module named 'no_such_module_here'"),
    (['--output', '{tmp}/file/runs'], "'{tmp}/file' is a file"),
])
def test_train_bad_values_are_one_line_before_any_model(argv, expected, tmp_path, capsys, no_model):
    (tmp_path / 'file').write_text('not a folder')
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    expected = expected.replace('{tmp}', str(tmp_path))
    code, out, err = call(train.run, ['--output', tmp_path / 'out', '--train-num-samples', '64', *argv], capsys)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('text, expected', [
    ('epochs: 1\nlr: [1, 2\n', 'is not valid YAML'),
    ('- epochs\n- 1\n', 'must be a mapping'),
    ('epochs: 1\nlearning_rate: 0.1\n', 'not train.py arguments: learning_rate'),
    ('batch_size: 0\n', 'batch_size: 0 is out of range: expected >= 1'),
    ('lr: -1.0e-3\n', 'lr: -0.001 is out of range'),
    ('lr: "fast"\n', "lr: expected a number, got 'fast'"),
    ('epochs: 2.5\n', 'epochs: expected an integer'),
    ('epochs: true\n', 'epochs: expected a number'),
    ('scale: 0.5\n', 'scale: expected 2 values'),
    ('mean: [0.5, 2.0, 0.5]\n', 'mean: 2 is out of range'),
    ('model_kwargs: depth\n', 'model_kwargs: expected a mapping'),
    ('amp: 1\n', 'amp: expected true or false'),
    ('sched: cosin\n', "sched: 'cosin' is not one of"),
    ('model: [vit]\n', 'model: expected a string'),
])
def test_config_values_get_the_command_line_checks(text, expected, tmp_path, capsys, no_model):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(text)
    code, out, err = call(train.run, ['-c', cfg, '--output', tmp_path / 'out'], capsys)
    assert_one_line_error(code, err, expected)


def test_lr_from_the_command_line_replaces_the_recipes_lr_base(tmp_path, capsys, no_model):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text('lr_base: 5.0e-4\n')
    args = train.parse_args(['-c', str(cfg), '--lr', '1e-3'])
    assert args.lr == pytest.approx(1e-3) and args.lr_base is None
    cfg.write_text('lr_base: 5.0e-4\nlr: 1.0e-3\n')
    code, out, err = call(train.run, ['-c', cfg, '--output', tmp_path / 'out'], capsys)
    assert_one_line_error(code, err, f"--lr and --lr-base both given in config file '{cfg}'")


def test_config_values_are_typed_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text('lr: 1e-3\nepochs: 3\nscale: [0.5, 1]\nmodel_kwargs: {depth: 2}\n')  # YAML reads 1e-3 as a string
    args = train.parse_args(['-c', str(cfg), '--epochs', '5'])
    assert args.lr == pytest.approx(1e-3) and isinstance(args.lr, float)
    assert args.scale == [0.5, 1.0] and args.model_kwargs == {'depth': 2} and args.epochs == 5


@pytest.mark.parametrize('kwargs, expected', [
    (['depth=abc'], "refuses --model-kwargs depth='abc'"),
    (['depth=-1'], 'refuses --model-kwargs depth=-1'),
    (['depht=2'], "refuses --model-kwargs depht=2: Unknown model kwarg 'depht'"),
    (['embed_dim=24', 'num_heads=5'], 'refuses --model-kwargs num_heads=5: embed_dim (24) must be divisible'),
])
def test_model_kwargs_the_model_refuses_are_named(kwargs, expected, tmp_path, capsys):
    code, out, err = call(train.run, ['--model-kwargs', *kwargs, '-j', '0', *SMALL_DATA, '--output', tmp_path], capsys)
    assert_one_line_error(code, err, expected)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('argv, expected', [
    (['--opt', 'sgd', '--momentum', '0'], 'Nesterov momentum requires a momentum'),
    (['--opt-kwargs', 'betas_typo=1'], "unexpected keyword argument 'betas_typo'"),
    (['--lr', '1e-6', '--min-lr', '1e-5'], '--min-lr 1e-05 is above the learning rate 1e-06'),
])
def test_train_settings_refused_once_the_model_exists_are_one_line(argv, expected, tmp_path, capsys):
    code, out, err = call(train.run, [*argv, '--output', tmp_path, *SMALL_DATA, *TINY], capsys)
    assert_one_line_error(code, err, expected)
    assert list(tmp_path.iterdir()) == []


def test_image_folder_without_the_split_folder_is_refused(tmp_path, capsys, no_model):
    """timm reads the whole root when a split has no folder: train/ would silently be evaluated on too."""
    from PIL import Image
    for label in ('a', 'b'):
        (tmp_path / 'data' / 'train' / label).mkdir(parents=True)
        Image.new('RGB', (32, 32)).save(tmp_path / 'data' / 'train' / label / '0.png')
    code, out, err = call(train.run, ['--data-dir', tmp_path / 'data', '--output', tmp_path / 'out'], capsys)
    assert_one_line_error(code, err, "no folder for split 'validation'", '(it has train)')


def test_explicit_lr_is_used(tmp_path, capsys):
    """--lr is the optimizer's learning rate, as given (only a missing --lr is derived from --lr-base)."""
    code, out, err = call(train.run, ['--lr', '2e-4', '--sched', 'none', '--epochs', '1', '--output', tmp_path,
                                      '--experiment', 'lr', '--no-attention-plot', *SMALL_DATA, *TINY], capsys)
    assert code == 0, err
    args = yaml.safe_load((tmp_path / 'lr' / 'args.yaml').read_text())
    assert args['lr'] == pytest.approx(2e-4) and args['lr_base'] is None
    assert float((tmp_path / 'lr' / 'summary.csv').read_text().splitlines()[1].split(',')[-1]) == pytest.approx(2e-4)


@pytest.mark.parametrize('make, expected', [
    (lambda p: p.write_bytes(b''), 'is empty (0 bytes)'),
    (lambda p: p.write_text('not a checkpoint'), 'could not read checkpoint'),
    (lambda p: p.write_bytes(b'PK\x03\x04' + b'\0' * 64), 'could not read checkpoint'),
    (lambda p: None, 'not found'),
])
@pytest.mark.parametrize('option', ['--resume', '--initial-checkpoint'])
def test_unreadable_checkpoints_are_one_line(option, make, expected, tmp_path, capsys, no_model):
    ckpt = tmp_path / 'bad.pth.tar'
    make(ckpt)
    code, out, err = call(train.run, [option, ckpt, '--output', tmp_path / 'out'], capsys)
    assert_one_line_error(code, err, expected)


@pytest.fixture
def command_logging(monkeypatch):
    """Logging as in a real run (train.py sets it up on stderr), undone after the test."""
    monkeypatch.setattr(logging.root, 'handlers', [])
    monkeypatch.setattr(logging.root, 'level', logging.root.level)


def test_interrupt_before_the_first_epoch_says_nothing_was_saved(tmp_path, capsys, monkeypatch, command_logging):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'train_one_epoch', interrupted)
    code, out, err = call(train.run, ['--output', tmp_path, '--experiment', 'exp', *SMALL_DATA, *TINY], capsys)
    assert code == 130 and 'Traceback' not in err
    assert err.splitlines()[-1] == 'interrupted: nothing saved yet: no epoch completed'
    assert not (tmp_path / 'exp' / 'last.pth.tar').exists()


def test_interrupt_after_an_epoch_names_it(tmp_path, capsys, monkeypatch, command_logging):
    real = train.train_one_epoch

    def second_epoch_interrupted(epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(epoch, *args, **kwargs)
    monkeypatch.setattr(train, 'train_one_epoch', second_epoch_interrupted)
    code, out, err = call(train.run, ['--output', tmp_path, '--experiment', 'exp', '--epochs', '3',
                                      '--no-attention-plot', *SMALL_DATA, *TINY], capsys)
    last = tmp_path / 'exp' / 'last.pth.tar'
    assert code == 130 and 'Traceback' not in err
    assert err.splitlines()[-1] == f'interrupted: {last} holds epoch 0; continue with --resume {last}'
    from timm_posattn.loading import read_checkpoint
    assert read_checkpoint(last).epoch == 0


# --------------------------------------------------------------------------------------------------------------------
# python -m timm_posattn.paper


@pytest.mark.parametrize('argv, expected', [
    (['transfer', '--seeds', '0'], '--seeds: 0 is out of range: expected >= 1'),
    (['transfer', '--steps', '-5'], '--steps: -5 is out of range'),
    (['association', '--steps', '0'], '--steps: 0 is out of range'),
    (['transfer', '--downstream-steps', '0'], '--downstream-steps: 0 is out of range'),
    (['transfer', '--n', '4', '0'], '--n: 0 is out of range'),
    (['association', '--num-sets', '0'], '--num-sets: 0 is out of range'),
    (['association', '--quick', '--num-sets', '3'], '--num-sets 3 over the quick preset'),
    (['association', '--num-patches', '10'], '--num-patches 10 over the full preset'),
    (['association', '--patch-dim', '1'], '--patch-dim: 1 is out of range: expected >= 2'),
    (['association', '--q', '2'], '--q: 2 is out of range: expected [0, 1]'),
    (['association', '--sigma', '-1'], '--sigma: -1 is out of range: expected >= 0'),
    (['association', '--threads', '0'], '--threads: 0 is out of range'),
    (['association', '--seed', '-1'], '--seed: -1 is out of range'),
    (['association', '--attention', 'softmax'], "invalid choice: 'softmax'"),
    (['association', '--init', 'zeros'], "invalid choice: 'zeros'"),
    (['association', '--n', '4'], '--n applies to the transfer experiment only'),
    (['association', '--seeds', '2'], '--seeds applies to the transfer experiment only'),
    (['transfer', '--seed', '1'], '--seed applies to the association experiment only'),
])
def test_paper_bad_values_are_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('an experiment ran before the arguments were checked')
    monkeypatch.setattr(paper, 'association_experiment', refuse)
    monkeypatch.setattr(paper, 'transfer_experiment', refuse)
    code, out, err = call(paper.run, [*argv, '--out', tmp_path / 'out'], capsys)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / 'out').exists()


def test_paper_explicit_seeds_and_steps_are_used(tmp_path):
    results = paper.main(['transfer', '--out', str(tmp_path), '--quick', '--steps', '3', '--seeds', '1', '--n', '4',
                          '--downstream-steps', '2'])
    assert results['num_seeds'] == 1 and len(results['pretrained_per_seed']) == 1
    assert results['settings']['steps'] == 3 and results['settings']['downstream_steps'] == 2
    assert json.loads((tmp_path / 'results.json').read_text())['num_seeds'] == 1


def test_paper_refuses_another_run_in_one_line(tmp_path, capsys):
    (tmp_path / 'results.json').write_text('{"mine": 1}')
    (tmp_path / 'notes.txt').write_text('mine')
    code, out, err = call(paper.run, ['association', '--out', tmp_path, '--quick', '--steps', '2'], capsys)
    assert_one_line_error(code, err, 'results.json', '--overwrite')
    assert (tmp_path / 'results.json').read_text() == '{"mine": 1}'


# --------------------------------------------------------------------------------------------------------------------
# The real command lines


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')


COMMAND_LINES = {  # each costs an interpreter with torch and timm (~5 s of CPU): the two entry points, once each
    'train.py': (['train.py', '--model-kwargs', 'depth=abc', '-j', '0', *SMALL_DATA],
                 "error: vit_posattn_tiny_patch4_32 refuses --model-kwargs depth='abc'"),
    'paper': (['-m', 'timm_posattn.paper', 'transfer', '--out', 'unused', '--seeds', '0'],
              'error: argument --seeds: 0 is out of range: expected >= 1'),
}


@pytest.fixture(scope='module')
def command_lines(tmp_path_factory):
    """Every command line of COMMAND_LINES run at once (each is mostly interpreter and torch start-up)."""
    cwd = tmp_path_factory.mktemp('cli')
    procs = {name: subprocess.Popen([sys.executable, *[str(REPO / a) if a == 'train.py' else a for a in argv]],
                                    cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in COMMAND_LINES.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        results[name] = proc.returncode, out, err
    assert list(cwd.iterdir()) == [], 'a refused command wrote something'
    return results


@pytest.mark.parametrize('name', list(COMMAND_LINES))
def test_command_line_errors_are_one_line_and_exit_2(command_lines, name):
    code, out, err = command_lines[name]
    assert_one_line_error(code, err, COMMAND_LINES[name][1])
