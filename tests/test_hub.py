"""Publishing to / loading from the Hugging Face Hub format, offline.

The Hub itself is never contacted: HF_HUB_OFFLINE=1 and sockets refuse to connect. Hub downloads are exercised
through a hand-built Hugging Face cache (models--ORG--NAME/{blobs,snapshots,refs}), which is exactly what
hf_hub_download reads when offline.
"""
import csv
import fnmatch
import hashlib
import inspect
import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import timm
import yaml

import timm_posattn  # noqa: F401  registers vit_posattn_*
from timm_posattn import hub, model_card, publish, releases

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
    torch.save(dict(state_dict=model.state_dict(), state_dict_ema=ema, arch=MODEL, epoch=CKPT_EPOCH, args=args,
                    metric=SUMMARY_TOP1[CKPT_EPOCH], optimizer=optimizer.state_dict()), path / 'checkpoint.pth.tar')
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
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not [p for p in out.parent.iterdir() if p.name.startswith('.')], 'temporary folder left behind'
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
    assert info['weights_sha256'] == hub.sha256_file(out / 'model.safetensors') == summary['weights_sha256']


def _front_matter(card: str):
    assert card.startswith('---\n')
    header, body = card[4:].split('\n---\n', 1)
    return yaml.safe_load(header), body


def test_model_card_metadata_and_only_measured_numbers(published):
    out, _ = published
    meta, body = _front_matter((out / 'README.md').read_text())
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert {'image-classification', 'timm', 'positional-attention', 'synthetic-data'} <= set(meta['tags'])
    assert 'datasets' not in meta  # the synthetic dataset has no Hub id; never claim one
    assert meta['metrics'] == ['accuracy']
    (entry,) = meta['model-index']
    (result,) = entry['results']
    assert result['task']['type'] == 'image-classification'
    # the checkpoint's own epoch row, not the last row; top-5 of a 2-class model is not reported
    assert [m['value'] for m in result['metrics']] == [SUMMARY_TOP1[CKPT_EPOCH]]
    assert 'Trained on synthetic data' in body
    assert f'| Top-1 accuracy (%) | {SUMMARY_TOP1[CKPT_EPOCH]:.2f} |' in body and 'best epoch 1' in body
    assert '| Throughput (img/s) | not measured |' in body  # benchmark skipped: no made-up speed
    assert 'no standard-attention twin' in body
    assert '$' not in body.replace('$model_name', '')  # every template placeholder was filled
    assert '/private/data' not in body  # local paths of the training run are not published
    assert 'import timm_posattn' in body and '2210.09221' in body and '@inproceedings' in body


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
    torch.testing.assert_close(_logits(hub.load_model(f'hf-hub:{REPO_ID}')), expected, rtol=0, atol=1e-6)


def test_registered_tag_pretrained_downloads_through_hf_hub_id(hf_cache, source_model):
    overlay = dict(hf_hub_id=REPO_ID)
    kwargs = dict(pretrained_cfg_overlay=overlay, **MODEL_KWARGS)  # the tag's own class count (2) must be used
    model = timm.create_model(f'{MODEL}.structured', pretrained=True, **kwargs)
    torch.testing.assert_close(_logits(model), _logits(source_model), rtol=0, atol=1e-6)
    model = hub.load_model(f'{MODEL}.structured', pretrained=True, **kwargs)
    torch.testing.assert_close(_logits(model), _logits(source_model), rtol=0, atol=1e-6)


def test_registered_tag_builds_its_own_class_count():
    assert timm.create_model(f'{MODEL}.structured', **MODEL_KWARGS).num_classes == 2


def test_corrupted_blob_in_hf_cache_gives_clear_error(hf_cache):
    blob = next(p for p in (hf_cache / 'blobs').iterdir() if len(p.name) == 64)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF  # a bit flip inside tensor data: structurally valid, checksum wrong
    blob.write_bytes(bytes(data))
    with pytest.raises(hub.WeightsFileError, match='sha256'):
        hub.load_model(f'hf-hub:{REPO_ID}')


@pytest.fixture
def folder_copy(published, tmp_path):
    return Path(shutil.copytree(published[0], tmp_path / 'copy'))


def test_truncated_safetensors_gives_clear_error(folder_copy):
    weights = folder_copy / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(hub.WeightsFileError, match='truncated'):
        hub.load_model(f'local-dir:{folder_copy}')
    with pytest.raises(hub.WeightsFileError, match='truncated'):
        hub.validate_safetensors(weights)


@pytest.mark.parametrize('damage, message', [
    (lambda data: data[:5], 'too short'),
    (lambda data: b'\xff' * 8 + data[8:], 'header claims'),
    (lambda data: data[:8] + b'#' + data[9:], 'not valid JSON'),
    (lambda data: data + b'\0' * 4, 'trailing bytes'),
])
def test_damaged_safetensors_variants(folder_copy, damage, message):
    weights = folder_copy / 'model.safetensors'
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(hub.WeightsFileError, match=message):
        hub.validate_safetensors(weights)
    with pytest.raises(hub.WeightsFileError):
        hub.load_model(folder_copy)  # a bare folder path works too


def test_bit_flip_caught_by_recorded_checksum(folder_copy):
    weights = folder_copy / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    hub.validate_safetensors(weights)  # structurally fine ...
    with pytest.raises(hub.WeightsFileError, match='sha256'):
        hub.load_model(f'local-dir:{folder_copy}')  # ... but not the weights that were published


def test_unknown_architecture_tells_user_to_import(folder_copy):
    cfg_file = folder_copy / 'config.json'
    for arch, hint in (('posattn_plugin_net', 'import timm_posattn'), ('vit_posattn_huge_patch2_9', 'upgrade')):
        cfg = json.loads(cfg_file.read_text())
        cfg['architecture'] = arch
        cfg_file.write_text(json.dumps(cfg))
        with pytest.raises(hub.UnknownArchitectureError, match=hint) as err:
            hub.load_model(f'local-dir:{folder_copy}')
        assert arch in str(err.value) and 'import timm_posattn' in str(err.value)
    with pytest.raises(FileNotFoundError, match='config.json'):
        hub.load_model(f'local-dir:{folder_copy / "missing"}')


def test_publish_refuses_non_empty_folder_without_force(run_dir, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    ckpt = str(run_dir / 'checkpoint.pth.tar')
    with pytest.raises(publish.RefusedOverwrite, match='--force'):
        publish.publish(ckpt, MODEL, str(out), benchmark=False)
    assert publish.main(['--checkpoint', ckpt, '--model', MODEL, '--out', str(out), '--no-benchmark']) == 1
    assert [p.name for p in out.iterdir()] == ['notes.txt']
    publish.publish(ckpt, MODEL, str(out), benchmark=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']


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
    def upload_folder(self, repo_id, folder_path, revision=None, **kwargs):
        FakeHfApi.calls.append(('upload_folder', repo_id, revision, sorted(os.listdir(folder_path))))
        return type('Commit', (), {'oid': 'c' * 40})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    FakeHfApi.calls, FakeHfApi.files = [], None
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
    return FakeHfApi


def test_upload_after_verification_and_card_without_results(run_dir, tmp_path, fake_hub):
    summary = publish.publish(str(run_dir / 'checkpoint.pth.tar'), MODEL, str(tmp_path / 'out'), repo_id=REPO_ID,
                              benchmark=False)
    assert fake_hub.calls == [('create_repo', REPO_ID),
                              ('upload_folder', REPO_ID, 'main', ['README.md', 'config.json', 'model.safetensors'])]
    assert summary['release_entry'] == dict(status='published', hf_hub_id=REPO_ID, revision='c' * 40,
                                            sha256=summary['weights_sha256'])
    meta, body = _front_matter((tmp_path / 'out' / 'README.md').read_text())
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True)" in body
    # published without --results: no accuracy is claimed anywhere
    assert 'model-index' not in meta and summary['result'] is None
    assert '| Top-1 accuracy (%) | not measured |' in body


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


def test_checkpoint_errors_are_clear(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match='Checkpoint not found'):
        publish.load_train_checkpoint(str(tmp_path / 'nope.pth.tar'))
    torch.save({'epoch': 3}, tmp_path / 'bad.pth.tar')
    with pytest.raises(ValueError, match="no 'state_dict'"):
        publish.load_train_checkpoint(str(tmp_path / 'bad.pth.tar'))
    with pytest.raises(ValueError, match='trained as'):
        publish.publish(str(run_dir / 'checkpoint.pth.tar'), 'vit_posattn_small_patch4_32', str(tmp_path / 'o'))
    with pytest.raises(hub.UnknownArchitectureError, match='import timm_posattn'):
        publish.publish(str(run_dir / 'checkpoint.pth.tar'), 'not_a_model', str(tmp_path / 'o'))


def test_measure_model_counts_params_macs_and_speed():
    model = _model().eval()
    stats = publish.measure_model(model, (3, 32, 32), batch_size=2, min_seconds=0.0)
    assert stats['params_m'] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    # lower bound: the patch embedding + head alone (64 patches x 48 -> 192, then 192 -> 2)
    assert stats['gmacs'] > (64 * 48 * 192 + 192 * 2) / 1e9
    assert stats['img_per_sec'] > 0 and 'CPU' in stats['bench_device']


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


def test_release_entries_are_validated():
    releases._check_entry('m.tag', dict(status='planned'))
    with pytest.raises(ValueError, match='status'):
        releases._check_entry('m.tag', dict(status='uploaded'))
    with pytest.raises(ValueError, match='hf_hub_id'):
        releases._check_entry('m.tag', dict(status='published', hf_hub_id=None))


def test_summary_of_another_run_is_rejected(run_dir, tmp_path):
    other = tmp_path / 'other_summary.csv'
    other.write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,1,1,10.0,100,0.1\n1,1,1,20.0,100,0.1\n')
    with pytest.raises(ValueError, match='not from the run'):
        publish.publish(str(run_dir / 'checkpoint.pth.tar'), MODEL, str(tmp_path / 'out'), results=str(other))
    assert not (tmp_path / 'out').exists()


def test_no_ema_publishes_plain_weights_without_the_ema_accuracy(run_dir, tmp_path):
    ckpt = run_dir / 'checkpoint.pth.tar'
    summary = publish.publish(str(ckpt), MODEL, str(tmp_path / 'out'), results=str(run_dir / 'summary.csv'),
                              use_ema=False, benchmark=False)
    assert summary['result'] is None  # summary.csv holds the EMA model's accuracy
    plain = _model()
    plain.load_state_dict(torch.load(ckpt, weights_only=True)['state_dict'])
    loaded = hub.load_model(tmp_path / 'out')
    torch.testing.assert_close(_logits(loaded), _logits(plain), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['timm_posattn']['weights'] == 'state_dict'


def test_dataset_facts_for_the_card():
    cifar100 = model_card.dataset_info('torch/cifar100', 100)
    assert cifar100['hub_id'] == 'cifar100' and len(set(cifar100['label_names'])) == 100
    imagenet = model_card.dataset_info('in1k', 1000)  # an ImageFolder run published with the .in1k tag
    assert imagenet['hub_id'] == 'imagenet-1k' and imagenet['label_names'][0] == 'n01440764'
    assert model_card.dataset_info('torch/cifar10', 5)['label_names'] is None  # relabelled subset: no wrong names
    unknown = model_card.dataset_info('hfds/someone/flowers', 7)
    assert unknown['hub_id'] is None and unknown['label_names'] is None and unknown['title'] == 'hfds/someone/flowers'


def test_card_names_the_attention_and_compares_with_the_twin(published):
    out, _ = published
    config = dict(json.loads((out / 'config.json').read_text()), num_classes=10)  # as if trained on CIFAR-10
    rows = [dict(epoch=0.0, eval_top1=60.0, eval_top5=100.0), dict(epoch=1.0, eval_top1=70.0, eval_top5=100.0)]
    twin_rows = [dict(epoch=0.0, eval_top1=65.0, eval_top5=100.0), dict(epoch=1.0, eval_top1=55.0, eval_top5=100.0)]
    result = model_card.select_result(rows, 1)
    twin = model_card.select_result(twin_rows, None, like=(result, rows))
    assert result['selection'] == 'final' and twin['eval_top1'] == 55.0  # the twin's final epoch, not its best
    info = dict(args={}, checkpoint='c.pth.tar', epoch=1, weights='state_dict')
    stats = dict(params_m=1.0, gmacs=0.1, gmacs_uncached=0.2)
    arch = dict(depth=2, embed_dim=192, num_heads=12, mlp_hidden=192, patch_size=(4, 4), positional_blocks=[0, 1])
    common = dict(template=model_card.find_card_template(MODEL), model_name=MODEL, config=config, info=info, stats=stats,
                  result=result, dataset=model_card.dataset_info('torch/cifar10', 10))
    card = model_card.render_model_card(twin=twin, architecture=arch, **common)
    assert '**positional attention** in every block' in card
    assert '| standard-attention twin | 55.00 | 100.00 | 1 |' in card and '| 70.00 |' in card
    assert '- cifar10' in card  # Hub dataset id in the metadata
    meta, _ = _front_matter(card)
    assert [m['value'] for m in meta['model-index'][0]['results'][0]['metrics']] == [70.0, 100.0]  # top-5: 10 classes
    two_class = model_card.render_model_card(twin=twin, architecture=arch,
                                          **dict(common, config=dict(config, num_classes=2)))
    assert '| standard-attention twin | 55.00 | n/a | 1 |' in two_class
    twin_card = model_card.render_model_card(twin=None, architecture=dict(arch, positional_blocks=[]), **common)
    assert '**standard attention** in every block' in twin_card and 'itself the standard-attention twin' in twin_card


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
    with pytest.raises(FileNotFoundError, match='vit_posattn_patch16_224.md not found.*--card-template'):
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
    used = {file for _, file in model_card._CARD_FAMILIES}
    assert used <= set(templates)
