"""Publishing to / loading from the Hugging Face Hub format, offline.

The Hub itself is never contacted: HF_HUB_OFFLINE=1 and sockets refuse to connect. Hub downloads are exercised
through a hand-built Hugging Face cache (models--ORG--NAME/{blobs,snapshots,refs}), which is exactly what
hf_hub_download reads when offline. Checkpoints are written with `loading.make_checkpoint` (train.py's format);
everything is read back through `timm_posattn.loading`.
"""
import csv
import fnmatch
import hashlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import timm
from huggingface_hub import ModelCard

import timm_posattn  # noqa: F401  registers vit_posattn_*
from timm_posattn import loading, model_card, publish, releases
from timm_posattn.cli import UsageError
from timm_posattn.outputs import LOCK_NAME, manifest_name
from timm_posattn.published import WeightsFileError, check_safetensors, sha256_file

REPO = Path(__file__).resolve().parents[1]

MODEL = 'vit_posattn_tiny_patch4_32'
REPO_ID = 'test-org/vit_posattn_tiny_patch4_32.structured'
SUMMARY_TOP1 = (50.0, 81.25, 62.5)  # epoch 1 is the checkpoint's epoch, and the best one
CKPT_EPOCH = 1
MODEL_KWARGS = dict(depth=2)  # train.py --model-kwargs depth=2: keeps the tests fast, and must survive export


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network, ever: offline mode on, and any socket connection fails the test."""
    import huggingface_hub.constants as hf_constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)

    def refuse(*args, **kwargs):
        raise AssertionError('test tried to open a network connection')
    monkeypatch.setattr(socket.socket, 'connect', refuse)


def _model(num_classes=2):
    return timm.create_model(MODEL, num_classes=num_classes, **MODEL_KWARGS)


def _batch():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def _logits(model):
    with torch.no_grad():
        return model.eval()(_batch())


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A briefly trained model saved like train.py does, with distinct EMA weights, and its summary.csv."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('run')
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,))
    for _ in range(1):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v.clone()
           for k, v in model.state_dict().items()}
    args = dict(model=MODEL, dataset='structured', num_classes=2, mean=[0.5] * 3, std=[1 / 6] * 3, crop_pct=1.0,
                interpolation='nearest', epochs=3, lr=0.1, opt='sgd', model_ema=True, val_split='validation',
                model_kwargs=MODEL_KWARGS,
                data_dir='/private/data')
    torch.save(loading.make_checkpoint(MODEL, CKPT_EPOCH, model.state_dict(), args, state_dict_ema=ema,
                                       metric=SUMMARY_TOP1[CKPT_EPOCH], optimizer=optimizer.state_dict()),
               path / 'checkpoint.pth.tar')
    with open(path / 'summary.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'])
        for epoch, top1 in enumerate(SUMMARY_TOP1):
            writer.writerow([epoch, 0.7, 0.6, top1, 100.0, 0.1])
    return path


@pytest.fixture(scope='module')
def source_model(run_dir):
    """The model publish must reproduce: the EMA weights of the checkpoint."""
    model = _model()
    ckpt = torch.load(run_dir / 'checkpoint.pth.tar', weights_only=True)
    model.load_state_dict(ckpt['state_dict_ema'])
    return model.eval()


@pytest.fixture(scope='module')
def published(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('pub') / 'folder'
    summary = publish.publish(str(run_dir / 'checkpoint.pth.tar'), MODEL, str(out),
                              results=str(run_dir / 'summary.csv'), benchmark=False)
    return out, summary


def test_publish_writes_timm_hub_folder_that_loads_with_identical_logits(published, source_model, run_dir):
    out, summary = published
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, manifest_name('publish'), 'README.md',
                                                             'config.json', 'model.safetensors'])
    assert sorted(p.name for p in out.parent.iterdir()) == ['folder'], 'temporary files left behind'
    assert summary['weights'].startswith('the EMA weights (state_dict_ema)')
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    torch.testing.assert_close(_logits(loaded), _logits(source_model), rtol=0, atol=1e-6)
    assert summary['max_logit_diff'] <= 1e-5
    # EMA weights were preferred: the non-EMA weights give different logits
    plain = _model()
    plain.load_state_dict(torch.load(run_dir / 'checkpoint.pth.tar', weights_only=True)['state_dict'])
    assert not torch.allclose(_logits(plain), _logits(loaded), atol=1e-4)


def test_config_json_has_timm_fields(published, source_model):
    out, summary = published
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == MODEL
    assert cfg['num_classes'] == 2 and cfg['num_features'] == source_model.num_features
    assert cfg['model_args']['num_classes'] == 2 and list(cfg['model_args']['img_size']) == [32, 32]
    assert cfg['model_args']['depth'] == 2
    pcfg = cfg['pretrained_cfg']
    assert pcfg['input_size'] == [3, 32, 32] and pcfg['crop_pct'] == 1.0 and pcfg['interpolation'] == 'nearest'
    assert pcfg['mean'] == [0.5] * 3 and pcfg['std'] == pytest.approx([1 / 6] * 3)
    assert pcfg['label_names'] == cfg['label_names'] == ['-1', '+1'] and pcfg['num_classes'] == 2
    assert not {'hf_hub_id', 'url', 'file', 'source'} & set(pcfg), 'source locations must not be exported'
    info = cfg['timm_posattn']
    assert info['weights'] == 'state_dict_ema' and info['epoch'] == CKPT_EPOCH
    assert info['weights_sha256'] == sha256_file(out / 'model.safetensors') == summary['weights_sha256']


def _front_matter(text: str):
    """The card as the Hub reads it: huggingface_hub.ModelCard parses the metadata."""
    card = ModelCard(text)
    return card.data, card.text


def test_model_card_metadata_and_only_measured_numbers(published):
    out, _ = published
    meta, body = _front_matter((out / 'README.md').read_text())
    assert meta.library_name == 'timm' and meta.license == 'apache-2.0' and meta.pipeline_tag == 'image-classification'
    assert {'image-classification', 'timm', 'positional-attention', 'synthetic-data'} <= set(meta.tags)
    assert 'datasets' not in meta.to_dict()  # the synthetic dataset has no Hub id; never claim one
    assert meta.metrics == ['accuracy']
    assert meta.model_name == MODEL
    (result,) = meta.eval_results  # the checkpoint's own epoch row; top-5 of a 2-class model is not reported
    assert result.task_type == 'image-classification' and result.metric_type == 'accuracy'
    assert result.metric_value == SUMMARY_TOP1[CKPT_EPOCH] and result.dataset_split == 'validation'
    assert result.dataset_type == 'structured' and result.dataset_name.startswith('Synthetic')
    assert 'Trained on synthetic data' in body
    assert f'| Top-1 accuracy (%) | {SUMMARY_TOP1[CKPT_EPOCH]:.2f} |' in body and 'best epoch 1' in body
    assert '| Throughput (img/s) | not measured |' in body  # benchmark skipped: no made-up speed
    assert 'no standard-attention twin' in body
    assert '$' not in body.replace('$model_name', '')  # every template placeholder was filled
    assert '/private/data' not in body  # local paths of the training run are not published
    assert 'import timm_posattn' in body and '2210.09221' in body and '@inproceedings' in body
    # the positional attention layer the checkpoint was trained with, read off the built model
    assert "use the `'qk'` positional attention layer (`pos_attn_layer='qk'`, `QKAttentionMap`)" in body
    assert "| Positional attention layer | `'qk'` (`QKAttentionMap`) |" in body
    assert '| GMACs |' in body and '| GMACs, reparameterized |' in body and 'reparameterize_model' in body


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _as_hf_cache(folder: Path, cache: Path, repo_id: str, commit: str = 'a' * 40) -> Path:
    """Lay out a published folder the way hf_hub_download caches a repo (LFS blobs are named by sha256)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    (repo / 'blobs').mkdir()
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if file.suffix == '.safetensors' else _git_blob_sha1(data)
        (repo / 'blobs' / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path('..', '..', 'blobs', blob))
    return repo


@pytest.fixture
def hf_cache(published, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    cache = tmp_path / 'hf' / 'hub'
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    return _as_hf_cache(published[0], cache, REPO_ID)


def test_hf_hub_name_loads_from_cache_offline(hf_cache, source_model):
    expected = _logits(source_model)
    model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    assert model.pretrained_cfg['label_names'] == ('-1', '+1') or list(model.pretrained_cfg['label_names']) == [
        '-1', '+1']
    torch.testing.assert_close(_logits(loading.load_model(f'hf-hub:{REPO_ID}').model), expected, rtol=0, atol=1e-6)


def test_registered_tag_pretrained_downloads_through_hf_hub_id(hf_cache, source_model):
    overlay = dict(hf_hub_id=REPO_ID)
    kwargs = dict(pretrained_cfg_overlay=overlay, **MODEL_KWARGS)  # the tag's own class count (2) must be used
    model = timm.create_model(f'{MODEL}.structured', pretrained=True, **kwargs)
    torch.testing.assert_close(_logits(model), _logits(source_model), rtol=0, atol=1e-6)
    model = loading.load_model(f'{MODEL}.structured', pretrained=True, **kwargs).model
    torch.testing.assert_close(_logits(model), _logits(source_model), rtol=0, atol=1e-6)


def test_registered_tag_builds_its_own_class_count():
    assert timm.create_model(f'{MODEL}.structured', **MODEL_KWARGS).num_classes == 2


def test_corrupted_blob_in_hf_cache_gives_clear_error(hf_cache):
    blob = next(p for p in (hf_cache / 'blobs').iterdir() if len(p.name) == 64)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF  # a bit flip inside tensor data: structurally valid, checksum wrong
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match='sha256'):
        loading.load_model(f'hf-hub:{REPO_ID}')


@pytest.fixture
def folder_copy(published, tmp_path):
    return Path(shutil.copytree(published[0], tmp_path / 'copy'))


@pytest.mark.parametrize('damage, message', [
    (lambda data: data[:-1000], 'not fully covered'),  # truncated
    (lambda data: data[:5], 'header too small'),
    (lambda data: b'\xff' * 8 + data[8:], 'header too large'),
    (lambda data: data[:8] + b'#' + data[9:], 'invalid JSON'),
    (lambda data: data + b'\0' * 4, 'not fully covered'),  # trailing bytes
])
def test_damaged_safetensors_variants(folder_copy, damage, message):
    weights = folder_copy / 'model.safetensors'
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(WeightsFileError, match=message):
        check_safetensors(weights)
    with pytest.raises(WeightsFileError, match='damaged or incomplete'):
        loading.load_model(folder_copy)  # a bare folder path works too


def test_bit_flip_caught_by_recorded_checksum(folder_copy):
    weights = folder_copy / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    check_safetensors(weights)  # structurally fine ...
    with pytest.raises(WeightsFileError, match='sha256'):
        loading.load_model(f'local-dir:{folder_copy}')  # ... but not the weights that were published


def test_unknown_architecture_tells_user_to_import(folder_copy):
    cfg_file = folder_copy / 'config.json'
    for arch, hint in (('posattn_plugin_net', 'import timm_posattn'), ('vit_posattn_huge_patch2_9', 'upgrade')):
        cfg = json.loads(cfg_file.read_text())
        cfg['architecture'] = arch
        cfg_file.write_text(json.dumps(cfg))
        with pytest.raises(loading.UnknownArchitectureError, match=hint) as err:
            loading.load_model(f'local-dir:{folder_copy}')
        assert arch in str(err.value) and 'import timm_posattn' in str(err.value)
    with pytest.raises(loading.LoadError, match='config.json'):
        loading.load_model(f'local-dir:{folder_copy / "missing"}')


def run_publish(capsys, *argv):
    """publish.run in-process: (exit code, stdout, stderr lines)."""
    code = publish.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_publish_into_a_run_folder_touches_only_its_own_files(run_dir, tmp_path, capsys):
    """--force replaces publish's three files and keeps every other file of the folder byte for byte."""
    run = tmp_path / 'run'
    run.mkdir()
    for name in ('checkpoint.pth.tar', 'summary.csv'):
        shutil.copy(run_dir / name, run / name)
    (run / 'notes.txt').write_text('mine')
    others = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = ['--checkpoint', run / 'checkpoint.pth.tar', '--model', MODEL, '--out', run, '--no-benchmark']
    code, out, err = run_publish(capsys, *argv)  # no file of publish's there yet: nothing to replace
    assert code == 0, err
    assert 'Published the EMA weights (state_dict_ema)' in out
    published = {name: (run / name).read_bytes() for name in publish.PUBLISHED_FILES}
    code, out, err = run_publish(capsys, *argv, '--results', run / 'summary.csv')
    assert code == 2 and len(err) == 1 and '--force' in err[0] and 'README.md' in err[0], err
    assert {name: (run / name).read_bytes() for name in publish.PUBLISHED_FILES} == published  # refused: unchanged
    for flag in ('--force', '--overwrite'):
        code, out, err = run_publish(capsys, *argv, '--results', run / 'summary.csv', flag)
        assert code == 0, err
    assert (run / 'README.md').read_bytes() != published['README.md']  # replaced: the card now has the results
    assert sorted(p.name for p in run.iterdir()) == sorted([*others, *publish.PUBLISHED_FILES, LOCK_NAME,
                                                            manifest_name('publish')])
    assert {name: (run / name).read_bytes() for name in others} == others
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


def _real_signature(fn):
    """Calls to the fake must also fit the real HfApi method of the same name."""
    import huggingface_hub
    real = inspect.signature(getattr(huggingface_hub.HfApi, fn.__name__))

    def checked(self, *args, **kwargs):
        real.bind(self, *args, **kwargs)
        return fn(self, *args, **kwargs)
    return checked


class FakeHfApi:
    """Records what would be sent to the Hub; a repo holding ``files`` exists when files is not None."""
    calls = []
    files = None

    @_real_signature
    def __init__(self, token=None, **kwargs):
        pass

    @_real_signature
    def repo_exists(self, repo_id):
        return self.files is not None

    @_real_signature
    def list_repo_files(self, repo_id, revision=None):
        from huggingface_hub.utils import RevisionNotFoundError
        if revision != 'main':
            raise RevisionNotFoundError(f'no branch {revision}', response=SimpleNamespace(headers={}, request=None))
        return list(self.files)

    @_real_signature
    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(('create_repo', repo_id))

    @_real_signature
    def create_branch(self, repo_id, branch, **kwargs):
        FakeHfApi.calls.append(('create_branch', branch))

    @_real_signature
    def upload_folder(self, repo_id, folder_path, revision=None, allow_patterns=None, **kwargs):
        sent = [name for name in sorted(os.listdir(folder_path))
                if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns)]
        FakeHfApi.calls.append(('upload_folder', repo_id, revision, sent))
        return type('Commit', (), {'oid': 'c' * 40})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    FakeHfApi.calls, FakeHfApi.files = [], None
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
    return FakeHfApi


def test_upload_after_verification_and_card_without_results(run_dir, tmp_path, fake_hub):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'notes.txt').write_text('private')  # in the folder, never uploaded
    summary = publish.publish(str(run_dir / 'checkpoint.pth.tar'), MODEL, str(tmp_path / 'out'), repo_id=REPO_ID,
                              benchmark=False)
    assert fake_hub.calls == [('create_repo', REPO_ID),
                              ('upload_folder', REPO_ID, 'main', ['README.md', 'config.json', 'model.safetensors'])]
    assert summary['release_entry'] == dict(status='published', hf_hub_id=REPO_ID, revision='c' * 40,
                                            sha256=summary['weights_sha256'])
    meta, body = _front_matter((tmp_path / 'out' / 'README.md').read_text())
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True)" in body
    # published without --results: no accuracy is claimed anywhere
    assert 'model-index' not in meta.to_dict() and not meta.eval_results and summary['result'] is None
    assert '| Top-1 accuracy (%) | not measured |' in body


def test_release_entry_only_when_the_registered_tag_rebuilds_the_weights(run_dir, tmp_path, fake_hub, capsys):
    """pretrained=True for a registered tag builds the architecture's defaults: weights trained with other model
    kwargs (the main job's depth=1 tied model, here depth=2) are uploaded but get no releases.json entry; weights of
    the default architecture do."""
    tagged = f'{MODEL}.structured'
    summary = publish.publish(str(run_dir / 'checkpoint.pth.tar'), tagged, str(tmp_path / 'a'), repo_id=REPO_ID,
                              benchmark=False)
    assert 'do not fit the default' in summary['tag_mismatch'] and 'release_entry' not in summary
    torch.manual_seed(0)
    default = timm.create_model(MODEL, num_classes=2)
    path = tmp_path / 'default.pth.tar'
    torch.save(loading.make_checkpoint(MODEL, 0, default.state_dict(), dict(model=MODEL, num_classes=2)), path)
    summary = publish.publish(str(path), tagged, str(tmp_path / 'b'), repo_id=REPO_ID, benchmark=False, force=True)
    assert summary['tag_mismatch'] is None and summary['release_entry']['hf_hub_id'] == REPO_ID
    # same weights, other pooling: they load into the default model but compute other logits
    avg = timm.create_model(MODEL, num_classes=2, global_pool='avg', fc_norm=False)
    avg.load_state_dict(default.state_dict())
    why = publish.tag_rebuilds_model(avg, MODEL, (3, 32, 32))
    assert why is not None and 'computes other logits' in why


def test_existing_repo_not_overwritten_without_force(published, fake_hub):
    fake_hub.files = ['README.md', 'config.json', 'model.safetensors']
    with pytest.raises(publish.RefusedOverwrite, match='--force'):
        publish.upload_folder(published[0], REPO_ID)
    with pytest.raises(publish.RefusedOverwrite, match='--force'):  # refused before any export work
        publish.publish('no/such/checkpoint.pth.tar', MODEL, str(published[0].parent / 'new'), repo_id=REPO_ID)
    assert fake_hub.calls == []
    publish.upload_folder(published[0], REPO_ID, revision='v2')  # a new branch is not an overwrite
    assert ('create_branch', 'v2') in fake_hub.calls and fake_hub.calls[-1][:3] == ('upload_folder', REPO_ID, 'v2')
    publish.upload_folder(published[0], REPO_ID, force=True)
    assert fake_hub.calls[-1][:3] == ('upload_folder', REPO_ID, 'main')


def test_failed_verification_publishes_nothing(run_dir, tmp_path, fake_hub, monkeypatch):
    original = publish.export_folder

    def export_wrong_weights(model, folder, *args, **kwargs):
        original(model, folder, *args, **kwargs)
        from safetensors.torch import load_file, save_file
        tensors = load_file(folder / 'model.safetensors')
        tensors['head.bias'] = tensors['head.bias'] + 1e-3
        save_file(tensors, folder / 'model.safetensors')
    monkeypatch.setattr(publish, 'export_folder', export_wrong_weights)
    out = tmp_path / 'out'
    with pytest.raises(publish.VerificationError, match='differ'):
        publish.publish(str(run_dir / 'checkpoint.pth.tar'), MODEL, str(out), repo_id=REPO_ID, benchmark=False)
    assert fake_hub.calls == [] and not out.exists() and list(tmp_path.iterdir()) == []


def test_unreachable_hub_is_one_line(run_dir, tmp_path, fake_hub, monkeypatch, capsys):
    import httpx2

    def refuse(self, repo_id):
        raise httpx2.ConnectError('[Errno 111] Connection refused')
    monkeypatch.setattr(FakeHfApi, 'repo_exists', refuse)
    code, _, err = run_publish(capsys, '--checkpoint', run_dir / 'checkpoint.pth.tar', '--model', MODEL, '--out',
                               tmp_path / 'out', '--repo-id', REPO_ID)
    assert code == 2 and len(err) == 1 and 'could not be reached' in err[0] and 'Connection refused' in err[0], err
    assert not (tmp_path / 'out').exists() and fake_hub.calls == []


def test_offline_repo_id_is_one_line(run_dir, tmp_path):
    """`--repo-id` with the Hub out of reach (offline mode): one line, exit 2, nothing written."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    proc = subprocess.run([sys.executable, '-m', 'timm_posattn.publish', '--checkpoint',
                           str(run_dir / 'checkpoint.pth.tar'), '--model', MODEL, '--out', str(tmp_path / 'out'),
                           '--repo-id', REPO_ID], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: ') and 'Traceback' not in proc.stderr
    assert 'offline' in proc.stderr and REPO_ID in proc.stderr
    assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def nan_checkpoint(run_dir):
    ckpt = torch.load(run_dir / 'checkpoint.pth.tar', weights_only=True)
    nan = {k: torch.full_like(v, float('nan')) if v.is_floating_point() else v for k, v in ckpt['state_dict'].items()}
    path = run_dir.parent / 'nan_checkpoint.pth.tar'
    torch.save(dict(ckpt, state_dict=nan, state_dict_ema=nan), path)
    return path


@pytest.mark.parametrize('checkpoint, model, expected', [
    ('{tmp}/nope.pth.tar', MODEL, "checkpoint '{tmp}/nope.pth.tar' not found"),
    ('{tmp}/bad.pth.tar', MODEL, 'has no weights'),
    ('{tmp}/empty.pth.tar', MODEL, 'is empty'),
    ('{run}/checkpoint.pth.tar', 'vit_posattn_small_patch4_32', 'trained as'),
    ('{run}/checkpoint.pth.tar', 'not_a_model', 'import timm_posattn'),
    ('{nan}', MODEL, 'non-finite'),
])
def test_checkpoint_errors_are_one_line_and_write_nothing(run_dir, nan_checkpoint, tmp_path, capsys, checkpoint,
                                                          model, expected):
    torch.save({'epoch': 3}, tmp_path / 'bad.pth.tar')
    (tmp_path / 'empty.pth.tar').write_bytes(b'')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')

    def fill(text):
        return text.replace('{tmp}', str(tmp_path)).replace('{run}', str(run_dir)).replace('{nan}', str(nan_checkpoint))
    code, _, err = run_publish(capsys, '--checkpoint', fill(checkpoint), '--model', model, '--out', out,
                               '--no-benchmark')
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and fill(expected) in err[0], err
    assert [p.name for p in out.iterdir()] == ['notes.txt']


@pytest.mark.parametrize('argv, expected', [
    (['--atol', '-1'], 'expected >= 0'),
    (['--bench-device', 'nodevice'], 'expected a device'),
    (['--use-ema', '--no-ema'], 'not allowed with'),
    (['--results', '{tmp}/missing.csv'], 'could not read results file'),
    (['--card-template', '{tmp}/missing.md'], 'could not read --card-template'),
])
def test_bad_options_are_one_line(run_dir, tmp_path, capsys, argv, expected):
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    code, _, err = run_publish(capsys, '--checkpoint', run_dir / 'checkpoint.pth.tar', '--model', MODEL, '--out',
                               tmp_path / 'out', *argv)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / 'out').exists()


def test_measure_model_counts_both_forms_and_speed():
    """GMACs of the model as loaded (A computed per forward) and of the reparameterized model (A baked)."""
    model = _model().eval()
    stats = publish.measure_model(model, (3, 32, 32), batch_size=2, min_seconds=0.0)
    assert stats['params_m'] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    # lower bound: the patch embedding + head alone (64 patches x 48 -> 192, then 192 -> 2)
    assert stats['gmacs_reparameterized'] > (64 * 48 * 192 + 192 * 2) / 1e9
    # the baked model skips computing A: per block LN(P)·[Wq Wk] (65 x 192 -> 384) and the 12 heads' 65 x 65 logits
    per_block = (65 * 192 * 384 + 12 * 65 * 65 * 16) / 1e9
    assert stats['gmacs'] - stats['gmacs_reparameterized'] == pytest.approx(MODEL_KWARGS['depth'] * per_block, rel=0.1)
    assert stats['img_per_sec'] > 0 and 'CPU' in stats['bench_device']
    assert not any(m.is_reparameterized() for m in model.modules() if hasattr(m, 'is_reparameterized'))
    twin = timm.create_model(MODEL, num_classes=2, pos_attn_blocks='none', **MODEL_KWARGS).eval()
    twin_stats = publish.measure_model(twin, (3, 32, 32), benchmark=False)
    assert twin_stats['gmacs'] == twin_stats['gmacs_reparameterized']


@pytest.mark.parametrize('layer', ['tied', 'logits'])
def test_card_names_the_layer_the_checkpoint_was_trained_with(tmp_path, layer):
    kwargs = dict(MODEL_KWARGS, pos_attn_layer=layer)
    model = timm.create_model(MODEL, num_classes=2, **kwargs)
    args = dict(model=MODEL, dataset='structured', num_classes=2, model_kwargs=kwargs)
    torch.save(loading.make_checkpoint(MODEL, 0, model.state_dict(), args), tmp_path / 'c.pth.tar')
    publish.publish(str(tmp_path / 'c.pth.tar'), MODEL, str(tmp_path / 'out'), benchmark=False)
    body = ModelCard((tmp_path / 'out' / 'README.md').read_text()).text
    cls = type(model.blocks[0].attn.pos_map).__name__
    assert f"use the `'{layer}'` positional attention layer (`pos_attn_layer='{layer}'`, `{cls}`)" in body
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['model_args']['pos_attn_layer'] == layer


def test_release_list_never_advertises_unpublished_tags(monkeypatch):
    registered = set(timm.list_models('vit_posattn*', include_tags=True))
    listed = releases.load_releases()
    tagged = {name for name in registered if '.' in name}
    assert tagged and tagged <= set(listed), f'registered tags missing from releases.json: {tagged - set(listed)}'
    assert set(timm.list_pretrained('vit_posattn*')) == set(releases.published_tags())
    for name, entry in listed.items():
        assert bool(releases.hub_cfg(name)) == (entry['status'] == 'published')
    published = {'a_model.tag': dict(status='published', hf_hub_id='org/repo', revision='abc')}
    monkeypatch.setattr(releases, 'load_releases', lambda: published)
    assert releases.hub_cfg('a_model.tag') == {'hf_hub_id': 'org/repo@abc'}
    assert releases.hub_cfg('a_model.other') == {}


@pytest.mark.parametrize('entry, error', [
    (dict(status='planned'), None),
    (dict(status='uploaded'), 'status'),
    (dict(status='published', hf_hub_id=None), 'hf_hub_id'),
    (dict(status='trained', folder='weights/x', sha256='0' * 64, upload='hf upload org/x weights/x .'), None),
    (dict(status='trained', folder='weights/x'), 'sha256, upload'),
])
def test_release_entries_are_validated(tmp_path, monkeypatch, entry, error):
    releases_file = tmp_path / 'releases.json'
    releases_file.write_text(json.dumps({'releases': {'m.tag': entry}}))
    monkeypatch.setattr(releases, 'RELEASES_FILE', releases_file)
    releases.load_releases.cache_clear()
    try:
        if error is None:
            assert releases.load_releases() == {'m.tag': entry}
        else:
            with pytest.raises(ValueError, match=error):
                releases.load_releases()
    finally:
        monkeypatch.undo()
        releases.load_releases.cache_clear()


def test_summary_of_another_run_is_rejected(run_dir, tmp_path):
    other = tmp_path / 'other_summary.csv'
    other.write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,1,1,10.0,100,0.1\n1,1,1,20.0,100,0.1\n')
    with pytest.raises(UsageError, match='not from the run'):
        publish.publish(str(run_dir / 'checkpoint.pth.tar'), MODEL, str(tmp_path / 'out'), results=str(other))
    assert not (tmp_path / 'out').exists()


def test_no_ema_publishes_plain_weights_without_the_ema_accuracy(run_dir, tmp_path):
    ckpt = run_dir / 'checkpoint.pth.tar'
    summary = publish.publish(str(ckpt), MODEL, str(tmp_path / 'out'), results=str(run_dir / 'summary.csv'),
                              use_ema=False, benchmark=False)
    assert summary['result'] is None  # summary.csv holds the EMA model's accuracy
    plain = _model()
    plain.load_state_dict(torch.load(ckpt, weights_only=True)['state_dict'])
    loaded = loading.load_model(tmp_path / 'out').model
    torch.testing.assert_close(_logits(loaded), _logits(plain), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['timm_posattn']['weights'] == 'state_dict'


def test_dataset_facts_for_the_card():
    cifar100 = model_card.card_dataset('torch/cifar100', 100)
    assert cifar100.hub_id == 'cifar100' and len(set(cifar100.label_names)) == 100
    imagenet = model_card.card_dataset('', 1000, tag='in1k')  # an ImageFolder run published with the .in1k tag
    assert imagenet.hub_id == 'imagenet-1k' and imagenet.label_names[0] == 'n01440764'
    assert model_card.card_dataset('torch/cifar10', 5).label_names is None  # relabelled subset: no wrong names
    unknown = model_card.card_dataset('hfds/someone/flowers', 7)
    assert unknown.hub_id is None and unknown.label_names is None and unknown.title == 'hfds/someone/flowers'


def test_card_names_the_attention_and_compares_with_the_twin(published):
    out, _ = published
    config = dict(json.loads((out / 'config.json').read_text()), num_classes=10)  # as if trained on CIFAR-10
    rows = [dict(epoch=0.0, eval_top1=60.0, eval_top5=100.0), dict(epoch=1.0, eval_top1=70.0, eval_top5=100.0)]
    twin_rows = [dict(epoch=0.0, eval_top1=65.0, eval_top5=100.0), dict(epoch=1.0, eval_top1=55.0, eval_top5=100.0)]
    result = model_card.select_result(rows, 1)
    twin = model_card.select_result(twin_rows, None, like=(result, rows))
    assert result['selection'] == 'final' and twin['eval_top1'] == 55.0  # the twin's final epoch, not its best
    checkpoint = loading.TrainCheckpoint(path='run/c.pth.tar', state_dict={}, epoch=1)
    stats = dict(params_m=1.0, gmacs=0.2, gmacs_reparameterized=0.1)
    arch = model_card.describe_architecture(_model())
    common = dict(template=model_card.find_card_template(MODEL), model_name=MODEL, config=config,
                  checkpoint=checkpoint, weights='state_dict', stats=stats, result=result,
                  dataset=model_card.card_dataset('torch/cifar10', 10))
    card = model_card.render_model_card(twin=twin, architecture=arch, **common)
    assert '**positional attention** in every block' in card
    assert '| standard-attention twin | 55.00 | 100.00 | 1 |' in card and '| 70.00 |' in card
    assert '| GMACs | 0.200 |' in card and '| GMACs, reparameterized | 0.100 |' in card
    meta, _ = _front_matter(card)
    assert meta.datasets == ['cifar10']  # Hub dataset id in the metadata
    assert [(r.metric_type, r.metric_value) for r in meta.eval_results] == [('accuracy', 70.0),
                                                                            ('top_5_accuracy', 100.0)]
    assert all(r.dataset_type == 'cifar10' and r.dataset_name == 'CIFAR-10' for r in meta.eval_results)
    two_class = model_card.render_model_card(twin=twin, architecture=arch,
                                             **dict(common, config=dict(config, num_classes=2)))
    assert '| standard-attention twin | 55.00 | n/a | 1 |' in two_class
    standard = timm.create_model(MODEL, num_classes=2, pos_attn_blocks='none', **MODEL_KWARGS)
    twin_card = model_card.render_model_card(twin=None, architecture=model_card.describe_architecture(standard),
                                             **common)
    assert '**standard attention** in every block' in twin_card and 'itself the standard-attention twin' in twin_card
    assert 'it uses no positional attention layer' in twin_card


def test_card_templates_found_in_package_then_checkout(tmp_path, monkeypatch):
    """A wheel ships the templates as timm_posattn/model_cards/; a checkout keeps them in model_cards/."""
    packaged, checkout = tmp_path / 'packaged', tmp_path / 'checkout'
    checkout.mkdir()
    (checkout / 'vit_posattn_patch4_32.md').write_text('checkout card', encoding='utf-8')
    monkeypatch.setattr(model_card, 'CARD_DIRS', (packaged, checkout))
    assert model_card.find_card_template('vit_posattn_small_patch4_32') == 'checkout card'
    packaged.mkdir()
    (packaged / 'vit_posattn_patch4_32.md').write_text('packaged card', encoding='utf-8')
    assert model_card.find_card_template('vit_posattn_tiny_patch4_32') == 'packaged card'
    with pytest.raises(UsageError, match='vit_posattn_patch16_224.md not found.*--card-template'):
        model_card.find_card_template('vit_posattn_small_patch16_224')


def test_pyproject_ships_every_card_template():
    """The wheel maps model_cards/ into the package: every template there must match the package-data glob."""
    tomllib = pytest.importorskip('tomllib')  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / 'pyproject.toml').read_text(encoding='utf-8'))['tool']['setuptools']
    assert pyproject['package-dir']['timm_posattn.model_cards'] == 'model_cards'
    assert 'timm_posattn.model_cards' in pyproject['packages']
    globs = pyproject['package-data']['timm_posattn.model_cards']
    templates = sorted(p.name for p in (root / 'model_cards').iterdir())
    assert templates and all(any(fnmatch.fnmatch(t, g) for g in globs) for t in templates)
    used = {file for _, file in model_card.CARD_FAMILIES}
    assert used <= set(templates)


def test_trained_release_folder_loads_through_timm_and_matches_its_entry():
    """The weights of a 'trained' tag lie in this repository: the folder verifies (digests, config), its sha256 is the
    release entry's, and the registered tag builds the published model from it (timm's own loading path)."""
    for name, entry in releases.load_releases().items():
        if entry['status'] != 'trained':
            continue
        folder = REPO / entry['folder']
        assert sha256_file(folder / 'model.safetensors') == entry['sha256']
        from_folder = loading.load_model(f'local-dir:{folder}').model.eval()
        from_tag = timm.create_model(name, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'))).eval()
        x = torch.randn(2, *from_tag.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(from_tag(x), from_folder(x), rtol=0, atol=0)
        assert not timm.list_pretrained(name)  # not uploaded: nothing advertised
