"""The third red-team pass (../shared/redteam/2026-12-02-report.md): one regression test per broken case, named by
its id. Each checks the mechanism that now holds (claim, manifest, run id, set commit, published digests, checks
before work), on a tiny trained run and its published folder.

Cases tested elsewhere: O5 (test_train.py::test_overwrite_removes_only_the_previous_runs_files), N1
(test_cli_policy.py, --lr 1e39), V5 and V6 (test_visualize.py::test_plot_rejects_bad_requests).
"""
import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import train  # noqa: E402
import validate  # noqa: E402
from cli_assertions import assert_one_line_error  # noqa: E402
from timm_posattn import convert, export, outputs, paper, publish, run_folder, visualize  # noqa: E402
from timm_posattn.convert import ConvertError, convert_vit  # noqa: E402
from timm_posattn.files import atomic_write, temp_prefix  # noqa: E402
from timm_posattn.loading import LoadError, load_model, read_checkpoint  # noqa: E402
from timm_posattn.outputs import (  # noqa: E402
    LOCK_NAME, OutputFolder, finish_interrupted_commits, manifest_name, read_manifest,
)
from timm_posattn.published import (  # noqa: E402
    NonFiniteWeightsError, WeightsFileError, config_digest, publish_record,
)

MODEL = 'vit_posattn_tiny_patch4_32'
TINY = ['--model-kwargs', 'depth=1', 'embed_dim=24', 'num_heads=2', '-j', '0', '--log-interval', '100',
        '--no-attention-plot']
DATA = ['--train-num-samples', '64', '--val-num-samples', '32', '-b', '32']


def run_train(capsys, *argv):
    code = train.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder):
    """Every file of a folder (hidden ones too), byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-block positional run (2 epochs) and its published folder."""
    out = tmp_path_factory.mktemp('runs')
    train.main(['--output', str(out), '--experiment', 'base', '--epochs', '2', *TINY, *DATA])
    pub = out / 'pub'
    assert publish.run(['--checkpoint', str(out / 'base' / 'model_best.pth.tar'), '--model', MODEL, '--out',
                         str(pub), '--no-benchmark']) == 0
    return out / 'base', pub


@pytest.fixture
def folder_copy(trained, tmp_path):
    copy = tmp_path / 'pub'
    shutil.copytree(trained[1], copy)
    return copy


def edit_config(folder, edit, keep_digest=False):
    """Edit a published config.json; keep_digest recomputes publish's record (a consistent rewrite)."""
    path = folder / 'config.json'
    cfg = json.loads(path.read_text())
    edit(cfg)
    if keep_digest:
        cfg['timm_posattn'].update(publish_record(cfg, folder / 'model.safetensors'))
    path.write_text(json.dumps(cfg))


def validate_folder(capsys, folder):
    code = validate.run(['--model', f'local-dir:{folder}', '--num-samples', '32', '-j', '0'])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------------------------
# Published folders


def test_A02_A03b_timm_create_model_checks_the_published_folder(folder_copy):
    """timm's own loading path, after `import timm_posattn`, checks the recorded digest and finiteness."""
    weights = folder_copy / 'model.safetensors'
    sd = load_file(weights)
    sd['head.bias'] = sd['head.bias'] + 0.5
    save_file(sd, weights, metadata={'format': 'pt'})
    with pytest.raises(WeightsFileError, match='sha256'):
        timm.create_model(f'local-dir:{folder_copy}', pretrained=True)
    sd['head.weight'][0, 0] = float('nan')
    save_file(sd, weights, metadata={'format': 'pt'})
    edit_config(folder_copy, lambda cfg: None, keep_digest=True)  # the digests match the NaN weights
    with pytest.raises(NonFiniteWeightsError, match='head.weight'):
        timm.create_model(f'local-dir:{folder_copy}', pretrained=True)


@pytest.mark.parametrize('name', ['pytorch_model.bin', 'model.pth'])
def test_A04_A04b_P9_a_weights_file_other_than_the_recorded_one_is_refused(folder_copy, trained, tmp_path, capsys,
                                                                           name):
    marker = tmp_path / 'PWNED'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    sd = load_file(folder_copy / 'model.safetensors')
    (folder_copy / 'model.safetensors').unlink()
    torch.save({**sd, 'head.weight': torch.zeros_like(sd['head.weight'])}, folder_copy / name)
    code, out, err = validate_folder(capsys, folder_copy)
    assert_one_line_error(code, err, 'model.safetensors is missing', f'timm would load {name}')
    with pytest.raises(WeightsFileError, match=name):
        timm.create_model(f'local-dir:{folder_copy}', pretrained=True)
    code, out, err = run_train(capsys, '--kd-model-name', f'local-dir:{folder_copy}', '--output', tmp_path,
                               '--epochs', '1', *TINY, *DATA)
    assert code == 2 and 'model.safetensors is missing' in err, err
    assert not (tmp_path / 'runs').exists()
    torch.save({'x': Payload()}, folder_copy / name)  # a malicious pickle in place of the weights
    code, out, err = validate_folder(capsys, folder_copy)
    assert_one_line_error(code, err, 'model.safetensors is missing')
    assert not marker.exists()
    edit_config(folder_copy, lambda cfg: cfg.pop('timm_posattn'))  # no record: timm's own folders have none
    code, out, err = validate_folder(capsys, folder_copy)
    assert_one_line_error(code, err, 'could not read checkpoint', name, 'weights_only=True')
    assert not marker.exists()


@pytest.mark.parametrize('edit', [
    lambda c: c['model_args'].update(global_pool='max'),  # A05
    lambda c: c['model_args'].update(act_layer='relu'),  # A05
    lambda c: c['pretrained_cfg'].update(mean=[0., 0., 0.], std=[1., 1., 1.]),  # A06
    lambda c: c['model_args'].update(qkv_bias=False),  # A22 (with pretrained_strict below)
], ids=['pool', 'activation', 'mean-std', 'qkv-bias'])
def test_A05_A06_A22_config_edits_are_refused(folder_copy, capsys, edit):
    edit_config(folder_copy, edit)
    code, out, err = validate_folder(capsys, folder_copy)
    assert_one_line_error(code, err, 'changed after publishing', 'config_sha256')


def test_A22_a_loading_switch_in_model_args_is_refused_even_without_a_digest(folder_copy, capsys):
    def edit(cfg):
        cfg['model_args'].update(qkv_bias=False, pretrained_strict=False)
        cfg.pop('timm_posattn')  # as timm's own save_for_hf folders: nothing recorded
    edit_config(folder_copy, edit)
    code, out, err = validate_folder(capsys, folder_copy)
    assert_one_line_error(code, err, "'pretrained_strict'", 'how weights are loaded')


@pytest.mark.parametrize('edit, expected', [
    (lambda c: c['timm_posattn'].update(weights_sha256=12345), 'must be a sha256'),  # A08b
    (lambda c: c.update(timm_posattn='oops'), "'timm_posattn' must be a mapping"),  # A08c
    (lambda c: c.update(architecture=123), "'architecture' must be a model name"),  # A25
    (lambda c: c.update(model_args=[1, 2]), "'model_args' must be a mapping"),  # A26
    (lambda c: c.update(pretrained_cfg=None), "'pretrained_cfg' must be a mapping"),  # A27
    (lambda c: (c.update(pretrained_cfg=None), c.pop('timm_posattn')), "'pretrained_cfg' must be a mapping"),  # A27
    (lambda c: c['pretrained_cfg'].update(mean='abc'), 'pretrained_cfg.mean must be'),  # A28
], ids=['A08b', 'A08c', 'A25', 'A26', 'A27', 'A27-no-record', 'A28'])
def test_malformed_config_fields_are_one_line(folder_copy, capsys, edit, expected):
    edit_config(folder_copy, edit)
    code, out, err = validate_folder(capsys, folder_copy)
    assert_one_line_error(code, err, expected)


@pytest.mark.parametrize('field, value, expected', [
    ('depth', 10 ** 9, 'the weights hold 1 blocks'),  # A09: never built
    ('depth', 10 ** 5, 'the weights hold 1 blocks'),  # A09b
    ('embed_dim', 12 * 10 ** 7, 'the weights are 24 wide'),  # A10b
    ('depth', -3, 'model_args.depth must be a positive integer'),  # A11
    ('img_size', [10 ** 6, 10 ** 6], 'position table has 65 positions'),  # A15
], ids=['A09', 'A09b', 'A10b', 'A11', 'A15'])
def test_absurd_sizes_are_refused_before_anything_is_built(folder_copy, capsys, monkeypatch, field, value, expected):
    """Checked against the weights' header, without the digest (timm's own folders record none)."""
    def edit(cfg):
        cfg['model_args'][field] = value
        cfg.pop('timm_posattn')
    edit_config(folder_copy, edit)
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: pytest.fail('a model was built'))
    with pytest.raises(LoadError, match=expected):
        load_model(f'local-dir:{folder_copy}')


def test_a_config_whose_model_does_not_fit_the_weights_is_refused_without_a_digest(folder_copy, capsys):
    edit_config(folder_copy, lambda cfg: (cfg['model_args'].update(qkv_bias=False), cfg.pop('timm_posattn')))
    code, out, err = validate_folder(capsys, folder_copy)
    assert_one_line_error(code, err, 'does not fit the weights', 'blocks.0.attn.')


# --------------------------------------------------------------------------------------------------------------------
# Run folders


def test_O10_a_second_run_into_a_folder_being_written_is_refused(trained, tmp_path, capsys):
    """The first run holds the folder from its start, before it wrote anything (the window the check alone left
    open), and with files there --overwrite cannot take it either."""
    run = tmp_path / 'race'
    argv = ['--output', tmp_path, '--experiment', 'race', '--epochs', '1', *TINY, *DATA]
    with OutputFolder(run, run_folder.OWNED_FILES, command='train.py', key='train').claim() as claim:
        before = snapshot(run)
        code, out, err = run_train(capsys, *argv)
        assert_one_line_error(code, err, 'is being written by train.py', f'pid {os.getpid()}')
        assert snapshot(run) == before
        claim.write_text('args.yaml', 'the first run\n')
        before = snapshot(run)
        code, out, err = run_train(capsys, *argv, '--overwrite')
        assert_one_line_error(code, err, 'is being written by train.py')
        assert snapshot(run) == before


def test_R1_a_checkpoint_of_another_run_is_not_continued_in_this_runs_folder(trained, tmp_path, capsys):
    base, _ = trained
    other = tmp_path / 'other'
    code, out, err = run_train(capsys, '--output', tmp_path, '--experiment', 'other', '--epochs', '3', '--seed', '7',
                               *TINY, *DATA)
    assert code == 0, err
    (other / 'from_base.pth.tar').symlink_to(base / 'last.pth.tar')
    shutil.copy(base / 'last.pth.tar', other / 'copied.pth.tar')
    before = snapshot(other)
    for name in ('from_base.pth.tar', 'copied.pth.tar'):
        code, out, err = run_train(capsys, '--resume', other / name, '--epochs', '4', *TINY, *DATA)
        assert_one_line_error(code, err, 'belongs to run', 'fork it into a new folder')
        assert snapshot(other) == before
    code, out, err = run_train(capsys, '--resume', other / 'copied.pth.tar', '--experiment', 'fork', '--epochs', '3',
                               *TINY, *DATA)
    assert code == 0, err
    fork = read_manifest(tmp_path / 'fork', 'train')
    assert fork['forked_from']['run_id'] == read_checkpoint(base / 'last.pth.tar').run_id != fork['run_id']
    assert read_checkpoint(tmp_path / 'fork' / 'last.pth.tar').run_id == fork['run_id']


def test_a_checkpoint_without_a_run_id_is_forked_not_continued(trained, tmp_path, capsys):
    base, _ = trained
    legacy = tmp_path / 'legacy'
    shutil.copytree(base, legacy)
    ckpt = torch.load(legacy / 'last.pth.tar', weights_only=True)
    del ckpt['run_id']  # as 0.2.0 wrote them
    torch.save(ckpt, legacy / 'last.pth.tar')
    code, out, err = run_train(capsys, '--resume', legacy / 'last.pth.tar', '--epochs', '3', *TINY, *DATA)
    assert_one_line_error(code, err, 'has no run id', '--experiment NAME')


def test_killed_writers_temp_files_are_reclaimed_live_ones_kept(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    dead = folder / f'{temp_prefix("train")}dead.pth.tar'
    dead.write_bytes(b'half a checkpoint')
    live = folder / f'{temp_prefix("train")}live.pth.tar'
    live.write_bytes(b'being written')
    other = folder / f'{temp_prefix("publish")}x.json'
    other.write_bytes(b'not train.py\'s')
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer holds its temp file locked
    try:
        with OutputFolder(folder, run_folder.OWNED_FILES, key='train').claim():
            pass
        assert not dead.exists() and live.exists() and other.exists()
    finally:
        os.close(fd)


def test_a_refused_claim_leaves_no_trace(tmp_path, capsys):
    code, out, err = run_train(capsys, '--output', tmp_path, '--experiment', 'x', '--epochs', '1',
                               '--initial-checkpoint', tmp_path / 'missing.pth.tar', *TINY, *DATA)
    assert code == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('argv, expected', [
    (['--initial-checkpoint', '{base}/model_best.pth.tar'], '--initial-checkpoint gives the starting weights'),  # D7
    (['--pretrained'], '--pretrained gives the starting weights'),
])
def test_D7_resume_with_other_starting_weights_is_refused(trained, capsys, argv, expected):
    base, _ = trained
    before = snapshot(base)
    code, out, err = run_train(capsys, '--resume', base / 'last.pth.tar', '--epochs', '3',
                               *[a.format(base=base) for a in argv], *TINY, *DATA)
    assert_one_line_error(code, err, expected)
    assert snapshot(base) == before


def test_N4_resume_with_non_finite_ema_weights_is_refused(trained, tmp_path, capsys):
    run = tmp_path / 'ema'
    code, out, err = run_train(capsys, '--output', tmp_path, '--experiment', 'ema', '--epochs', '1', '--model-ema',
                               *TINY, *DATA)
    assert code == 0, err
    ckpt = torch.load(run / 'last.pth.tar', weights_only=True)
    ckpt['state_dict_ema']['head.weight'][0, 0] = float('nan')
    torch.save(ckpt, run / 'last.pth.tar')
    before = snapshot(run)
    code, out, err = run_train(capsys, '--resume', run / 'last.pth.tar', '--epochs', '2', '--model-ema', *TINY,
                               *DATA)
    assert_one_line_error(code, err, 'state_dict_ema', 'head.weight holds 1 non-finite')
    assert snapshot(run) == before


def test_N3_a_non_finite_evaluation_stops_the_run_unranked(tmp_path, capsys):
    code, out, err = run_train(capsys, '--output', tmp_path, '--experiment', 'nf', '--epochs', '1', '--opt', 'sgd',
                               '--lr', '1e38', '--warmup-epochs', '0', '--sched', 'none', '--weight-decay', '0',
                               *TINY, '--train-num-samples', '32', '--val-num-samples', '32', '-b', '32')
    assert code == 3, err
    assert 'evaluation of epoch 0 is not finite' in err.splitlines()[-1]
    assert 'Final top-1' not in out and 'Best' not in out
    assert not list((tmp_path / 'nf').glob('*.pth.tar'))


def test_Y13_a_recipe_key_given_twice_is_refused(tmp_path, capsys):
    recipe = tmp_path / 'dup.yaml'
    recipe.write_text('lr: 0.1\nlr: 0.2\n')
    code, out, err = run_train(capsys, '-c', recipe, '--output', tmp_path, *TINY, *DATA)
    assert_one_line_error(code, err, "key 'lr' is given twice", 'line 2')
    assert list(tmp_path.iterdir()) == [recipe]


# --------------------------------------------------------------------------------------------------------------------
# Outputs that cannot be written (F1-F8): one line, before any work


@pytest.fixture
def read_only(monkeypatch):
    """Every folder reads as being on a read-only file system (no mount needed), and no model may be built."""
    monkeypatch.setattr(outputs, 'why_unwritable', lambda folder: 'is on a read-only file system')
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: pytest.fail('work started before the output check'))


def _command_runs(trained, out):
    base, pub = trained
    ckpt = str(base / 'model_best.pth.tar')
    return {
        'F2 train.py': lambda: train.run(['--output', str(out), '--epochs', '1', *TINY, *DATA]),
        'F3 convert': lambda: convert.run(['--source', ckpt, '--dataset', 'structured', '--out', str(out)]),
        'F4 export': lambda: export.run([ckpt, '--output', str(out / 'm.onnx')]),
        'F5 publish': lambda: publish.run(['--checkpoint', ckpt, '--model', MODEL, '--out', str(out)]),
        'F6 visualize': lambda: visualize.run([ckpt, '--out', str(out / 'a.png')]),
        'F7 validate.py': lambda: validate.run(['--checkpoint', ckpt, '--results-file', str(out / 'r.json')]),
        'F8 paper': lambda: paper.run(['association', '--quick', '--out', str(out)]),
    }


@pytest.mark.parametrize('command', ['F2 train.py', 'F3 convert', 'F4 export', 'F5 publish', 'F6 visualize',
                                     'F7 validate.py', 'F8 paper'])
def test_F2_F8_a_read_only_output_folder_is_one_line_before_any_work(trained, tmp_path, capsys, read_only,
                                                                     command):
    code = _command_runs(trained, tmp_path / 'out')[command]()
    assert_one_line_error(code, capsys.readouterr().err, 'read-only file system')
    assert not (tmp_path / 'out').exists()


def test_F1_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    def full(path, write_fn, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device', path)
    monkeypatch.setattr(run_folder, 'atomic_write', full)
    code, out, err = run_train(capsys, '--output', tmp_path, '--experiment', 'full', '--epochs', '1', *TINY, *DATA)
    assert_one_line_error(code, err, 'No space left on device')
    assert not list((tmp_path / 'full').glob('*.pth.tar')) and not list((tmp_path / 'full').glob('.tmp_*'))


# --------------------------------------------------------------------------------------------------------------------
# Sets of files (PB2c, C20, PA8): the old set or the new one, whole


def test_PB2c_C20_a_kill_before_the_commit_leaves_the_old_set(tmp_path):
    folder = OutputFolder(tmp_path, ('a.txt', 'b.txt'), overwrite=True, key='set')
    with folder.claim() as claim:
        claim.stage_text('a.txt', 'old a')
        claim.stage_text('b.txt', 'old b')
        claim.commit()
    with pytest.raises(KeyboardInterrupt):
        with folder.claim() as claim:
            claim.stage_text('a.txt', 'new a')
            raise KeyboardInterrupt  # killed before the commit
    assert (tmp_path / 'a.txt').read_text() == 'old a' and (tmp_path / 'b.txt').read_text() == 'old b'
    assert not list(tmp_path.glob('.staging_*'))


def kill_during_the_switch(monkeypatch):
    """The process dies after the first file of a set was renamed into place, before the second (a KeyboardInterrupt
    out of os.replace)."""
    real_replace = os.replace
    moved = []

    def killed_after_one(src, dst):
        switching = '.staging_' in str(src) and '.staging_' not in str(dst)
        if switching and moved:
            raise KeyboardInterrupt
        real_replace(src, dst)
        if switching:
            moved.append(dst)
    monkeypatch.setattr(outputs.os, 'replace', killed_after_one)


def commit_then_kill_the_next_commit(monkeypatch, folder, old, new):
    """Commit the set `old` into `folder`, then the set `new` with the process killed during its switch (as
    `kill_during_the_switch`). A set maps file names to their text, or to a writer `fn(f)` of their bytes."""
    def commit(files):
        with folder.claim() as claim:
            for name, content in files.items():
                if callable(content):
                    claim.stage(name, content)
                else:
                    claim.stage_text(name, content)
            claim.commit()
    commit(old)
    kill_during_the_switch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        commit(new)
    monkeypatch.undo()


def test_PB2c_C20_a_kill_during_the_switch_is_completed_before_anything_reads_the_folder(tmp_path, monkeypatch):
    folder = OutputFolder(tmp_path, ('a.txt', 'b.txt', 'c.txt'), overwrite=True, key='set')
    commit_then_kill_the_next_commit(monkeypatch, folder, {name: f'old {name}' for name in ('a.txt', 'b.txt', 'c.txt')},
                                     {'a.txt': 'new a.txt', 'b.txt': 'new b.txt'})  # c.txt is not in the new set
    assert (tmp_path / 'a.txt').read_text() == 'new a.txt' and (tmp_path / 'b.txt').read_text() == 'old b.txt'
    assert finish_interrupted_commits(tmp_path) == ['this command']
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith('.')) == ['a.txt', 'b.txt']
    assert (tmp_path / 'b.txt').read_text() == 'new b.txt'
    assert read_manifest(tmp_path, 'set')['files'] == ['a.txt', 'b.txt']


def test_C20_reading_a_checkpoint_completes_an_interrupted_set_first(tmp_path, monkeypatch):
    """convert killed between switching in converted.pth.tar and report.json: whoever reads the checkpoint gets the
    new set whole (read_checkpoint finishes the commit first), never the new weights beside the old report."""
    folder = OutputFolder(tmp_path, ('converted.pth.tar', 'report.json'), overwrite=True, key='set')

    def weights(value):
        return lambda f: torch.save({'state_dict': {'w': torch.full((2,), value)}}, f)
    commit_then_kill_the_next_commit(monkeypatch, folder, {'converted.pth.tar': weights(1.), 'report.json': 'old'},
                                     {'converted.pth.tar': weights(2.), 'report.json': 'new'})
    assert (tmp_path / 'report.json').read_text() == 'old'  # the mix the kill left
    assert read_checkpoint(tmp_path / 'converted.pth.tar').state_dict['w'].tolist() == [2., 2.]
    assert (tmp_path / 'report.json').read_text() == 'new'


def test_a_claim_finishes_every_commands_interrupted_commit(tmp_path, monkeypatch):
    """publish killed while switching its set into a run folder; train.py then claims that folder and reads its own
    checkpoint there: the claim (the folder's one lock) finished publish's commit, so the read neither waits for
    itself nor sees the mix."""
    published = OutputFolder(tmp_path, ('README.md', 'model.safetensors'), overwrite=True, key='publish')
    commit_then_kill_the_next_commit(monkeypatch, published, {'README.md': 'old', 'model.safetensors': 'old'},
                                     {'README.md': 'new', 'model.safetensors': 'new'})
    assert (tmp_path / 'model.safetensors').read_text() == 'old'  # the mix the kill left
    with OutputFolder(tmp_path, ('last.pth.tar',), overwrite=True, key='train').claim() as claim:
        assert (tmp_path / 'model.safetensors').read_text() == 'new'
        claim.write('last.pth.tar', lambda f: torch.save({'state_dict': {'w': torch.ones(1)}}, f))
        assert read_checkpoint(tmp_path / 'last.pth.tar').state_dict['w'].tolist() == [1.]
    assert read_manifest(tmp_path, 'publish')['files'] == ['README.md', 'model.safetensors']
    assert 'journal' not in read_manifest(tmp_path, 'publish')


def test_PB2c_an_interrupted_publish_is_completed_by_the_next_load(trained, tmp_path, monkeypatch, capsys):
    base, pub = trained
    folder = tmp_path / 'pub'
    shutil.copytree(pub, folder)
    kill_during_the_switch(monkeypatch)
    code = publish.run(['--checkpoint', str(base / 'checkpoint-0.pth.tar'), '--model', MODEL, '--out', str(folder),
                         '--no-benchmark', '--force'])
    monkeypatch.undo()
    assert code == 130
    model = load_model(f'local-dir:{folder}').model  # completes the switch, then loads the whole new set
    assert 'epoch 0' in (folder / 'README.md').read_text() or '| 0 |' in (folder / 'README.md').read_text()
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['timm_posattn']['epoch'] == 0 and cfg['timm_posattn']['config_sha256'] == config_digest(cfg)
    assert model.num_classes == 2 and not list(folder.glob('.staging_*'))


def test_PA8_paper_overwrite_keeps_the_old_results_until_the_new_ones_are_complete(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'assoc'
    argv = ['association', '--quick', '--steps', '5', '--out', str(out)]
    assert paper.run(argv) == 0
    before = snapshot(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(paper, 'association_experiment', crash)
    assert paper.run(argv + ['--overwrite']) == 130
    assert snapshot(out) == before and not list(out.glob('.staging_*'))


# --------------------------------------------------------------------------------------------------------------------
# Values used or refused, and one-line errors of the APIs and small commands


@pytest.fixture(scope='module')
def standard_source():
    torch.manual_seed(0)
    return timm.create_model(MODEL, depth=1, embed_dim=24, num_heads=2, num_classes=2,
                             pos_attn_blocks='none').eval()


@pytest.mark.parametrize('kwargs, expected', [
    (dict(fit_steps=-5), 'fit_steps=-5: expected an integer >= 0'),  # CA1
    (dict(batch_size=0), 'batch_size=0: expected an integer >= 1'),  # CA4
    (dict(fit_lr=0), 'fit_lr=0: expected a finite number > 0'),
], ids=['CA1', 'CA4', 'fit_lr'])
def test_CA1_CA4_convert_vit_refuses_what_it_would_ignore(standard_source, kwargs, expected):
    with pytest.raises(ConvertError, match=expected):
        convert_vit(standard_source, torch.randn(4, 3, 32, 32), **kwargs)


def test_CA6_convert_vit_refuses_images_of_another_size(standard_source):
    with pytest.raises(ConvertError, match=r'shape \(4, 3, 64, 64\).*\(batch, 3x32x32\)'):
        convert_vit(standard_source, torch.randn(4, 3, 64, 64))


def test_CA7_convert_vit_names_non_finite_source_weights(standard_source):
    broken = timm.create_model(MODEL, depth=1, embed_dim=24, num_heads=2, num_classes=2, pos_attn_blocks='none')
    with torch.no_grad():
        broken.head.bias.fill_(float('inf'))
    with pytest.raises(NonFiniteWeightsError, match='head.bias'):
        convert_vit(broken, torch.randn(4, 3, 32, 32))


@pytest.mark.parametrize('argv, expected', [
    (['--opset', '999'], 'writes opsets 7 to'),  # E9
    (['--output', 'x.onnx', '--dynamo', '--opset', '7'], 'writes opsets 18 to'),
], ids=['E9', 'E9-dynamo'])
def test_E9_export_refuses_an_opset_its_exporter_cannot_write(trained, tmp_path, capsys, argv, expected):
    base, _ = trained
    full = [str(base / 'model_best.pth.tar'), '--output', str(tmp_path / 'm.onnx'), *argv]
    code = export.run(full)
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert list(tmp_path.iterdir()) == []


def test_U5_export_refuses_a_path_the_exporter_cannot_encode(trained, tmp_path, capsys):
    base, _ = trained
    folder = os.path.join(os.fsencode(tmp_path), b'nonutf\xff')
    os.mkdir(folder)
    argv = [str(base / 'model_best.pth.tar'), '--output', os.fsdecode(os.path.join(folder, b'm.onnx'))]
    code = export.run(argv)
    assert_one_line_error(code, capsys.readouterr().err, 'is not a UTF-8 path')


@pytest.mark.parametrize('template, expected', [
    ('card for $model_name and $nosuchkey\n', 'unknown field(s) $nosuchkey'),
    ('costs 5$ only\n', "a '$' on line 1 starts no field name"),
], ids=['unknown-field', 'stray-dollar'])
def test_PB10_a_card_template_that_cannot_be_filled_is_refused_before_work(trained, tmp_path, capsys, monkeypatch,
                                                                           template, expected):
    base, _ = trained
    path = tmp_path / 'card.md'
    path.write_text(template)
    monkeypatch.setattr(publish, 'model_from_checkpoint', lambda *a, **k: pytest.fail('work started before the check'))
    code = publish.run(['--checkpoint', str(base / 'model_best.pth.tar'), '--model', MODEL, '--out',
                         str(tmp_path / 'out'), '--card-template', str(path)])
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert not (tmp_path / 'out').exists()


def test_a_single_output_file_is_created_not_clobbered(tmp_path):
    """Two processes that both passed the check: the second write is refused, the first file kept."""
    folder = OutputFolder(tmp_path, ['r.json'], command='validate.py').check()
    (tmp_path / 'r.json').write_text('the other process\'s')
    with pytest.raises(outputs.OutputExistsError, match='appeared while validate.py ran'):
        folder.write_text('r.json', 'ours')
    assert (tmp_path / 'r.json').read_text() == 'the other process\'s'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.tmp_')]


def test_B1_B2_B4_benchmarks_refuse_bad_values_and_existing_outputs_with_exit_2(tmp_path, capsys):
    import attention_layout
    import distill_step
    precious = tmp_path / 'precious.json'
    precious.write_text('precious notes')
    code = attention_layout.run(['-b', '2', '--tokens', '17', '--dim', '24', '--heads', '2', '--warmup', '1',
                                 '--repeats', '1', '--json', str(precious)])
    assert_one_line_error(code, capsys.readouterr().err, 'already holds precious.json', '--overwrite')
    assert precious.read_text() == 'precious notes'
    assert distill_step.run(['--student', 'nosuch_model']) == 2
    assert 'nosuch_model' in capsys.readouterr().err
    for argv, expected in ((['-b', '-1'], '-1 is out of range'), (['--dim', '24', '--heads', '5'], 'divisible')):  # B2
        assert_one_line_error(attention_layout.run(argv), capsys.readouterr().err, expected)


def test_manifest_lists_what_a_run_wrote_and_the_lock_is_free_after_it(trained):
    base, pub = trained
    manifest = read_manifest(base, 'train')
    assert set(manifest['files']) == {p.name for p in base.iterdir() if not p.name.startswith('.')}
    assert read_checkpoint(base / 'last.pth.tar').run_id == manifest['run_id']
    with open(base / LOCK_NAME) as f:  # free again: the run released it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert manifest_name('train') in os.listdir(base)
    assert read_manifest(pub, 'publish')['files'] == ['README.md', 'config.json', 'model.safetensors']
    atomic_write(str(base / 'unrelated.txt'), lambda f: f.write(b'x'))  # a user's file: never listed
    assert 'unrelated.txt' not in read_manifest(base, 'train')['files']


def test_B6_throughput_refuses_one_file_for_the_rows_and_the_figure(tmp_path, capsys):
    import throughput
    same = str(tmp_path / 'same.out')
    argv = ['--models', MODEL, '--img-size', '32', '--json', same, '--plot', same]
    assert throughput.run(argv) == 2
    assert_one_line_error(2, capsys.readouterr().err, '--json and --plot both name')
    assert list(tmp_path.iterdir()) == []


def test_F1_a_full_disk_surfaces_as_the_os_error_it_is():
    """torch's zip writer reports a failed write as 'unexpected pos' (a RuntimeError, a traceback); checkpoints are
    serialized first, so the disk's ENOSPC reaches the error policy."""
    from timm_posattn.loading import make_checkpoint, write_checkpoint

    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(OSError, match='No space left'):
        write_checkpoint(make_checkpoint('m', 0, {'w': torch.zeros(1000)}), FullDisk())
