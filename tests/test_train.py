"""train.py / validate.py / timm_posattn.data: short CPU runs on tiny models and tiny datasets.

Runs go through ``train.run`` in-process (no interpreter start-up per run) except the 2-process torchrun check.
Every run uses a 1-block, width-24 positional ViT, a few hundred samples and no loader workers. The experiment-folder
and resume rules are checked here on the module's one trained run; the error policy in test_cli_policy.py.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from cli_assertions import assert_one_line_error  # noqa: E402
from timm_posattn.association import model_association  # noqa: E402
from timm_posattn.data import DatasetError, create_dataset  # noqa: E402
from timm_posattn.loading import load_model, make_checkpoint, read_checkpoint  # noqa: E402
from timm_posattn.outputs import OutputError, manifest_name  # noqa: E402

TINY = ['--model-kwargs', 'depth=1', 'embed_dim=24', 'num_heads=2', '-j', '0', '--log-interval', '100']
STRUCTURED_TINY = ['--train-num-samples', '384', '--val-num-samples', '128', '-b', '32', '--lr', '3e-3',
                   '--warmup-epochs', '0', '--smoothing', '0']
SMALL_DATA = ['--train-num-samples', '64', '--val-num-samples', '32', '-b', '32']  # for runs whose scores do not matter
EMA = ['--model-ema', '--model-ema-decay', '0.9']


def run_train(capsys, *argv):
    """Run train.py in-process; returns (exit code, stdout, stderr)."""
    code = train.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_summary(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def list_as_the_runs(folder, *names):
    """Add names to the run's manifest, as if the run had written those files."""
    path = Path(folder) / manifest_name('train')
    manifest = json.loads(path.read_text())
    manifest['files'] += [n for n in names if n not in manifest['files']]
    path.write_text(json.dumps(manifest))


def snapshot(folder):
    """Every file of a folder, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope='module')
def structured_run(tmp_path_factory):
    """One epoch on `structured` with EMA, then --resume to a second epoch (the resume test reads both states)."""
    out = tmp_path_factory.mktemp('out')
    first = train.main(['--output', str(out), '--experiment', 'exp', '--epochs', '1', *EMA, *STRUCTURED_TINY, *TINY])
    assert first['eval'] is not None
    exp = out / 'exp'
    first_ckpt = torch.load(exp / 'last.pth.tar', map_location='cpu', weights_only=True)
    first_summary = read_summary(exp / 'summary.csv')
    second = train.main(['--resume', str(exp / 'last.pth.tar'), '--epochs', '2', *EMA, *STRUCTURED_TINY, *TINY])
    assert second['output_dir'] == str(exp)
    return exp, first_ckpt, first_summary, second


def test_structured_run_learns_and_writes_outputs(structured_run):
    exp, first_ckpt, first_summary, _ = structured_run
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'attention.png'):
        assert (exp / name).is_file(), name
    assert not list(exp.glob('*.partial')) and not list(exp.glob('*.tmp')) and not list(exp.glob('.tmp_*'))
    rows = read_summary(exp / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert {'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'} <= set(rows[0])
    assert float(rows[-1]['eval_top1']) > 65.0, rows  # two balanced classes: chance is 50%
    # the reported association is that of the final (EMA) model against the hidden sets of the data it learned
    assoc = structured_run[3]['association']
    partition = create_dataset('structured', split='train', num_samples=1, data_seed=0).partition
    expected = model_association(load_model(str(exp / 'last.pth.tar')).model, partition)
    assert assoc['association'] == pytest.approx(expected['association']) and assoc['chance'] == pytest.approx(1 / 8)
    args = yaml.safe_load((exp / 'args.yaml').read_text())
    assert args['dataset'] == 'structured' and args['model'] == 'vit_posattn_tiny_patch4_32'


def test_checkpoints_load_weights_only(structured_run):
    exp, _, _, _ = structured_run
    for name in ('last.pth.tar', 'model_best.pth.tar'):
        ckpt = torch.load(exp / name, map_location='cpu', weights_only=True)  # raises on pickled objects
        assert isinstance(ckpt['args'], dict) and ckpt['args']['model_kwargs']['depth'] == 1
        assert {'state_dict', 'state_dict_ema', 'optimizer', 'epoch'} <= set(ckpt)


def test_resume_continues_epoch_and_optimizer(structured_run):
    exp, first_ckpt, first_summary, _ = structured_run
    last = torch.load(exp / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert first_ckpt['epoch'] == 0 and last['epoch'] == 1
    # AdamW's step counter continues from the first run instead of restarting
    first_steps = next(iter(first_ckpt['optimizer']['state'].values()))['step']
    last_steps = next(iter(last['optimizer']['state'].values()))['step']
    assert float(last_steps) == 2 * float(first_steps)
    # the first epoch's summary row is kept, not repeated
    rows = read_summary(exp / 'summary.csv')
    assert rows[0] == first_summary[0] and len(rows) == 2
    # the EMA was restored and kept moving (it differs from the raw weights after training)
    key = 'head.weight'
    assert not torch.equal(last['state_dict_ema'][key], first_ckpt['state_dict_ema'][key])


def test_existing_experiment_is_not_overwritten(structured_run, capsys):
    exp, _, _, _ = structured_run
    before = snapshot(exp)
    code, out, err = run_train(capsys, '--output', exp.parent, '--experiment', exp.name, '--epochs', '1',
                               *STRUCTURED_TINY, *TINY)
    assert_one_line_error(code, err, 'already holds', '--overwrite')
    assert snapshot(exp) == before


def test_resume_into_another_runs_folder_is_refused(structured_run, tmp_path, capsys):
    """--resume A/last.pth.tar --experiment B, B another run: B is left exactly as it was (and so is A)."""
    exp, _, _, _ = structured_run
    other = tmp_path / 'other'
    shutil.copytree(exp, other)
    (other / 'notes.txt').write_text('mine')
    before, source_before = snapshot(other), snapshot(exp)
    code, out, err = run_train(capsys, '--resume', exp / 'last.pth.tar', '--output', tmp_path, '--experiment',
                               'other', '--epochs', '3', *EMA, *STRUCTURED_TINY, *TINY)
    assert_one_line_error(code, err, f"'{other}'", 'already holds files', 'fork')
    assert snapshot(other) == before and snapshot(exp) == source_before


def test_resume_into_a_new_folder_forks_the_run(structured_run, tmp_path, capsys):
    exp, _, _, _ = structured_run
    before = snapshot(exp)
    code, out, err = run_train(capsys, '--resume', exp / 'last.pth.tar', '--output', tmp_path, '--experiment', 'fork',
                               '--epochs', '3', '--no-attention-plot', *EMA, *STRUCTURED_TINY, *SMALL_DATA, *TINY)
    assert code == 0, err
    fork = tmp_path / 'fork'
    assert [int(r['epoch']) for r in read_summary(fork / 'summary.csv')] == [2]
    assert read_checkpoint(fork / 'last.pth.tar').epoch == 2 and read_checkpoint(fork / 'model_best.pth.tar').epoch == 2
    assert snapshot(exp) == before


def test_resume_from_an_earlier_checkpoint_abandons_the_later_run(structured_run, tmp_path, capsys):
    """Resuming at epoch 1 abandons what the run wrote from epoch 1 on: none of it is kept, and the best model is the
    resumed history's best (epoch 0 here, ranked 100 % so that no new epoch can replace it), never the abandoned
    run's best."""
    exp, _, _, _ = structured_run
    run = tmp_path / 'exp'
    shutil.copytree(exp, run)
    first = read_checkpoint(run / 'checkpoint-0.pth.tar')
    saver = {'checkpoint_files': [('checkpoint-0.pth.tar', 100.0)], 'best_epoch': 0, 'best_metric': 100.0,
             'pending': (0, 100.0)}
    torch.save(make_checkpoint(first.arch, 0, first.state_dict, args=first.args, metric=100.0, run_id=first.run_id,
                               state_dict_ema=first.state_dict_ema, **{**first.raw, 'saver': saver}),
               run / 'checkpoint-0.pth.tar')
    abandoned = make_checkpoint(first.arch, 5, first.state_dict, args=first.args, metric=100.0, run_id=first.run_id)
    for name in ('checkpoint-5.pth.tar', 'model_best.pth.tar'):
        torch.save(abandoned, run / name)
    list_as_the_runs(run, 'checkpoint-5.pth.tar', 'model_best.pth.tar')
    (run / 'notes.txt').write_text('mine')
    code, out, err = run_train(capsys, '--resume', run / 'checkpoint-0.pth.tar', '--epochs', '2',
                               '--no-attention-plot', *EMA, *STRUCTURED_TINY, *SMALL_DATA, *TINY)
    assert code == 0, err
    assert sorted(p.name for p in run.glob('checkpoint-*')) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar']
    assert [int(r['epoch']) for r in read_summary(run / 'summary.csv')] == [0, 1]
    assert read_checkpoint(run / 'last.pth.tar').epoch == 1
    best = read_checkpoint(run / 'model_best.pth.tar')
    assert (best.epoch, best.metric) == (0, 100.0)
    assert 'Best top1: 100.0000 (epoch 0)' in out
    assert (run / 'notes.txt').read_text() == 'mine'


def test_overwrite_removes_only_the_previous_runs_files(tmp_path, capsys):
    """--overwrite removes the files the earlier run's manifest lists, never a file that only looks like one of a
    run's (checkpoint-*.pth.tar, *.partial), and a new run starts its own summary."""
    run = tmp_path / 'exp'
    argv = ['--output', tmp_path, '--experiment', 'exp', '--no-attention-plot', *SMALL_DATA, *TINY]
    code, out, err = run_train(capsys, *argv, '--epochs', '2', '--checkpoint-hist', '2')
    assert code == 0, err
    assert (run / 'checkpoint-1.pth.tar').is_file()
    mine = {'checkpoint-teacher.pth.tar': b'a teacher', 'imagenet.pth.tar.partial': b'a download',
            'checkpoint-7.pth.tar': b'kept from elsewhere', 'notes.txt': b'mine'}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    before = snapshot(run)
    code, out, err = run_train(capsys, *argv, '--epochs', '1')
    assert_one_line_error(code, err, 'already holds', '--overwrite')
    assert snapshot(run) == before
    code, out, err = run_train(capsys, *argv, '--epochs', '1', '--overwrite')
    assert code == 0, err
    assert not (run / 'checkpoint-1.pth.tar').exists()  # the earlier run's
    assert {name: (run / name).read_bytes() for name in mine} == mine
    assert [int(r['epoch']) for r in read_summary(run / 'summary.csv')] == [0]


@pytest.mark.parametrize('argv, expected', [
    (['--model', 'vit_posattn_small_patch4_32'], 'is a checkpoint of vit_posattn_tiny_patch4_32'),
    (['--model-kwargs', 'depth=2', 'embed_dim=24', 'num_heads=2'], 'depth=1 there, 2 here'),
    (['--opt', 'sgd'], 'was trained with --opt adamw'),
    (['--epochs', '2'], 'completed epoch 1: --epochs 2 leaves nothing to train'),
    (['--eval-metric', 'loss'], 'ranked its checkpoints by top1'),
    (['--overwrite'], '--overwrite would remove the run that --resume continues'),
])
def test_resume_that_cannot_continue_the_run_is_one_line(structured_run, argv, expected, capsys):
    exp, _, _, _ = structured_run
    before = snapshot(exp)
    code, out, err = run_train(capsys, '--resume', exp / 'last.pth.tar', '--epochs', '3', *EMA, *STRUCTURED_TINY,
                               *TINY, *argv)
    assert_one_line_error(code, err, expected)
    assert snapshot(exp) == before


def test_initial_checkpoint_weights_are_the_start(structured_run, tmp_path, capsys):
    """--initial-checkpoint loads the checkpoint's (EMA) weights: with a negligible lr the run ends where it began."""
    exp, _, _, _ = structured_run
    code, out, err = run_train(capsys, '--initial-checkpoint', exp / 'last.pth.tar', '--output', tmp_path,
                               '--experiment', 'init', '--epochs', '1', '--lr', '1e-12', '--weight-decay', '0',
                               '--warmup-epochs', '0', '--min-lr', '0', '--no-attention-plot', *SMALL_DATA, *TINY)
    assert code == 0, err
    start, _ = read_checkpoint(exp / 'last.pth.tar').weights()
    end = read_checkpoint(tmp_path / 'init' / 'last.pth.tar').state_dict
    assert start.keys() == end.keys()
    for key in start:
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=1e-6)


def test_initial_checkpoint_of_another_model_is_one_line(structured_run, tmp_path, capsys):
    exp, _, _, _ = structured_run
    code, out, err = run_train(capsys, '--initial-checkpoint', exp / 'last.pth.tar', '--output', tmp_path,
                               '--model-kwargs', 'depth=2', 'embed_dim=24', 'num_heads=2', '-j', '0', *SMALL_DATA)
    assert_one_line_error(code, err, str(exp / 'last.pth.tar'), 'depth=2')
    assert list(tmp_path.iterdir()) == []


def _image_folder(root: Path, per_class: int = 12):
    """train/ and validation/ with two colour classes whose images differ in their left half."""
    gen = torch.Generator().manual_seed(0)
    for split in ('train', 'validation'):
        for label, colour in enumerate(((220, 40, 40), (40, 40, 220))):
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise = torch.randint(0, 40, (32, 32, 3), generator=gen, dtype=torch.uint8)
                img = noise.clone()
                img[:, :16] += torch.tensor(colour, dtype=torch.uint8)
                Image.fromarray(img.numpy()).save(folder / f'{i}.png')
    return root


def test_image_folder_with_yaml_config(tmp_path, capsys):
    data = _image_folder(tmp_path / 'data')
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({
        'model': 'vit_posattn_tiny_patch4_32', 'model_kwargs': {'depth': 1, 'embed_dim': 24, 'num_heads': 2,
                                                                'pos_attn_blocks': 'none'},
        'epochs': 1, 'batch_size': 8, 'lr': '1e-3', 'workers': 0, 'hflip': 0.0, 'experiment': 'folder',
    }))
    code, out, err = run_train(capsys, '-c', cfg, '--data-dir', data, '--output', tmp_path / 'out', '-b', '16')
    assert code == 0, err
    args = yaml.safe_load((tmp_path / 'out' / 'folder' / 'args.yaml').read_text())
    assert args['batch_size'] == 16  # the command line overrides the config
    assert args['lr'] == pytest.approx(1e-3) and args['hflip'] == 0.0  # config values, YAML strings typed
    assert args['model_kwargs']['pos_attn_blocks'] == 'none' and args['num_classes'] == 2  # from the folders
    assert args['dataset'] == '' and not args['no_aug']
    assert 'Final top-1' in out and 'Patch association' not in out  # no positional blocks in the twin
    rows = read_summary(tmp_path / 'out' / 'folder' / 'summary.csv')
    assert len(rows) == 1


@pytest.mark.parametrize('path', sorted((REPO / 'configs').glob('*.yaml')), ids=lambda p: p.name)
def test_recipes_parse_into_train_arguments(path):
    args = train.parse_args(['-c', str(path)])
    cfg = yaml.safe_load(path.read_text())
    for key, value in cfg.items():
        got = getattr(args, key)
        assert got == value or got == pytest.approx(value), key
    assert args.opt == 'adamw' and args.sched == 'cosine'
    assert args.model_kwargs['pos_attn_blocks'] in ('all', 'none')
    if path.stem.endswith(('_posattn', '_standard')):  # the comparisons (the others: test_distill.py)
        assert args.epochs == (10 if path.stem.startswith('fashion_mnist') else 300)  # Fashion-MNIST: CPU-sized


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'svhn', 'imagenet', 'fashion_mnist'])
def test_recipe_twins_differ_only_in_attention(name):
    pos = yaml.safe_load((REPO / 'configs' / f'{name}_posattn.yaml').read_text())
    std = yaml.safe_load((REPO / 'configs' / f'{name}_standard.yaml').read_text())
    assert pos.pop('model_kwargs') == {'pos_attn_blocks': 'all'}
    assert std.pop('model_kwargs') == {'pos_attn_blocks': 'none'}
    assert pos.pop('experiment') != std.pop('experiment')
    assert pos == std
    expected_batch = 128  # per process: 128 for the small datasets, 8 x 128 = 1024 for ImageNet
    assert pos['batch_size'] == expected_batch


@pytest.mark.parametrize('argv, expected', [
    (['--data-dir', '/nonexistent/imagenet'], 'does not exist'),
    (['--dataset', 'torch/cifar10', '--data-dir', '/nonexistent/cifar'], 'does not exist'),
    (['--dataset', 'torch/svhn', '--data-dir', '{tmp}'], 'train_32x32.mat'),
    (['--data-dir', '{tmp}/empty'], 'Found 0 images'),
    (['--data-dir', '{tmp}/file.txt'], 'is a file'),
])
def test_bad_dataset_path_is_one_clean_line(tmp_path, capsys, argv, expected):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    (tmp_path / 'file.txt').write_text('not a dataset')
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    code, out, err = run_train(capsys, *argv, '--output', tmp_path / 'out', *TINY)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], err
    assert 'Traceback' not in err


def test_structured_splits_share_the_partition():
    train_ds = create_dataset('structured', split='train', num_samples=8, data_seed=3)
    val_ds = create_dataset('structured', split='validation', num_samples=8, data_seed=3)
    assert torch.equal(train_ds.partition, val_ds.partition)
    with pytest.raises(DatasetError, match='no split'):
        create_dataset('structured', split='extra')


def test_svhn_splits(tmp_path):
    with pytest.raises(DatasetError, match="split 'bogus'"):
        create_dataset('torch/svhn', root=str(tmp_path), split='bogus')
    with pytest.raises(DatasetError, match='extra_32x32.mat'):
        create_dataset('torch/svhn', root=str(tmp_path), split='extra')
    with pytest.raises(DatasetError, match='test_32x32.mat'):  # validation is SVHN's test split
        create_dataset('torch/svhn', root=str(tmp_path), split='validation')


def test_non_finite_loss_stops_with_the_step(tmp_path, capsys):
    code, out, err = run_train(capsys, '--output', tmp_path, '--experiment', 'nan', '--epochs', '1',
                               '--opt', 'sgd', '--lr', '1e30', '--train-num-samples', '96', '--val-num-samples', '32',
                               '-b', '16', *TINY)
    assert code == 3
    assert 'non-finite' in err or 'loss is' in err
    assert 'step' in err and 'epoch 0' in err
    assert not (tmp_path / 'nan' / 'last.pth.tar').exists()


def test_torchrun_two_processes_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(REPO / 'train.py'), '--output', str(tmp_path), '--experiment', 'ddp', '--epochs', '1',
           '--device', 'cpu', *STRUCTURED_TINY, *TINY, '--no-attention-plot']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('Final top-1') == 1  # only rank 0 reports
    assert proc.stdout.count('Patch association') == 1
    assert 'Distributed training: 2 processes' in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ddp']
    rows = read_summary(tmp_path / 'ddp' / 'summary.csv')
    assert len(rows) == 1  # written once, by rank 0
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])  # saved unwrapped from DDP


def test_interrupted_checkpoint_write_keeps_the_good_file(tmp_path, monkeypatch):
    """A crash while writing never replaces last/best with a broken file."""
    import argparse
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model='linear', model_kwargs={'depth': 1})
    saver = train.AtomicCheckpointSaver(model=model, optimizer=optimizer, args=args, checkpoint_dir=str(tmp_path),
                                        recovery_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(0, metric=50.0)
    good = (tmp_path / 'last.pth.tar').read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *a, **kw):
        real_save({'partial': torch.zeros(3)}, f)
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OutputError, match='disk full'):  # one line for the user (a full disk is theirs to fix)
        saver.save_checkpoint(1, metric=90.0)
    monkeypatch.setattr(torch, 'save', real_save)

    assert (tmp_path / 'last.pth.tar').read_bytes() == good
    assert not list(tmp_path.glob('*.partial'))
    for name in ('last.pth.tar', 'model_best.pth.tar'):
        ckpt = torch.load(tmp_path / name, map_location='cpu', weights_only=True)
        assert ckpt['epoch'] == 0 and ckpt['args'] == {'model': 'linear', 'model_kwargs': {'depth': 1}}


def test_amp_scaler_state_round_trips_through_the_checkpoint(tmp_path):
    """The saver stores the AMP loss scaler (make_checkpoint's extra state) and --resume's restore brings it back."""
    import argparse
    from timm import utils
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = utils.NativeScaler(device='cpu')
    scaler(model(torch.randn(3, 4)).sum(), optimizer)  # one step: its growth tracker is no longer a fresh scaler's
    args = argparse.Namespace(model='linear', model_kwargs={})
    saver = train.AtomicCheckpointSaver(model=model, optimizer=optimizer, args=args, amp_scaler=scaler,
                                        checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=1.0)
    ckpt = read_checkpoint(tmp_path / 'last.pth.tar')
    restored = utils.NativeScaler(device='cpu')
    epoch = train.restore_training_state(ckpt, torch.nn.Linear(4, 2), torch.optim.SGD(model.parameters(), lr=0.1),
                                         loss_scaler=restored)
    assert epoch == 1 and restored.state_dict() == scaler.state_dict()


def test_structured_demo_defaults_apply_only_to_the_demo_run():
    """No --model on structured: the measured demo recipe (1 tied block, avg pool, 30 epochs, lr-base 3e-3); user values
    win."""
    def resolved(*argv):
        args = train.parse_args(list(argv))
        train.resolve_defaults(args)
        return args
    demo = resolved()
    assert demo.model_kwargs == {'depth': 1, 'global_pool': 'avg', 'pos_attn_layer': 'tied'} and demo.gp is None
    assert demo.epochs == 30 and demo.lr_base == pytest.approx(3e-3)
    twin = resolved('--model-kwargs', 'pos_attn_blocks=none', 'depth=2', '--epochs', '5', '--lr-base', '1e-3')
    assert twin.model_kwargs == {'depth': 2, 'global_pool': 'avg', 'pos_attn_layer': 'tied', 'pos_attn_blocks': 'none'}
    assert twin.epochs == 5 and twin.lr_base == pytest.approx(1e-3)
    assert resolved('--gp', 'token').model_kwargs == {'depth': 1, 'pos_attn_layer': 'tied'}
    assert resolved('--model-kwargs', 'pos_attn_layer=qk').model_kwargs['pos_attn_layer'] == 'qk'
    other = resolved('--model', 'vit_posattn_small_patch4_32')
    assert other.model_kwargs == {} and other.epochs == 2 and other.lr_base == pytest.approx(1e-3)
    folder = resolved('--data-dir', '/nonexistent')
    assert folder.model_kwargs == {} and folder.epochs == 2


def test_a_warmup_as_long_as_the_run_is_said(tmp_path, capsys, caplog):
    """--epochs 1 with the default one warmup epoch never reaches --lr: the run says so (the value is still used)."""
    argv = ['--output', tmp_path, '--no-attention-plot', '--epochs', '1', *SMALL_DATA, *TINY]
    code, out, err = run_train(capsys, *argv, '--experiment', 'warm')
    assert code == 0, err
    assert '--warmup-epochs 1 covers all 1 epochs' in caplog.text
    caplog.clear()
    code, out, err = run_train(capsys, *argv, '--experiment', 'cold', '--warmup-epochs', '0')
    assert code == 0, err
    assert 'covers all' not in caplog.text
