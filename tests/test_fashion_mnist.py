"""Fashion-MNIST end to end on tiny generated idx files: train.py (1-channel 28 px), validate.py, convert, publish and
the attention-distance figure, with the error policy on missing folders, damaged files and wrong channel counts.

Three 1-epoch train.py runs on 64 / 32 images (tests/idx_files.py writes them in the real idx format) give the
checkpoints: the positional model, its standard twin (`pos_attn_blocks=none`) and timm's own ViT of the same shape.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
import validate  # noqa: E402
from attention_by_hand import attention_by_hand  # noqa: E402
from cli_assertions import assert_one_line_error  # noqa: E402
from idx_files import split_file, write_dataset  # noqa: E402
from timm_posattn.dataset_info import get_dataset_info  # noqa: E402

FASHION = get_dataset_info('torch/fashion_mnist')
COMMON = ['--dataset', 'torch/fashion_mnist', '--input-size', '1', '28', '28', '-j', '0', '-b', '16', '--epochs', '1',
          '--log-interval', '100', '--warmup-epochs', '0']
POSATTN = ['--model', 'vit_posattn_tiny_patch4_32', '--model-kwargs', 'depth=2', 'embed_dim=24', 'num_heads=2']
STANDARD = POSATTN + ['pos_attn_blocks=none']
TIMM_VIT = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'patch_size=4', 'embed_dim=24', 'depth=2',
            'num_heads=2', 'mlp_ratio=1']


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """64 train / 32 test images, gzipped, flat: the layout of Debian's dataset-fashion-mnist package."""
    return write_dataset(tmp_path_factory.mktemp('fashion'), n_train=64, n_test=32)


@pytest.fixture(scope='module')
def runs(data, tmp_path_factory):
    """{name: (run folder, final eval metrics)} of the three 1-epoch runs."""
    out = tmp_path_factory.mktemp('runs')
    result = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: fastest on one thread
    try:
        for name, model in (('posattn', POSATTN), ('standard', STANDARD), ('timm_vit', TIMM_VIT)):
            run = train.main([*COMMON, *model, '--data-dir', str(data), '--output', str(out), '--experiment', name,
                              '--no-attention-plot'])
            result[name] = (Path(run['output_dir']), run['eval'])
    finally:
        torch.set_num_threads(threads)
    return result


def test_train_normalizes_with_the_datasets_own_values(runs):
    """No --mean/--std, from scratch: Fashion-MNIST's mean/std, crop and interpolation (the table's), one channel."""
    for name, (run, metrics) in runs.items():
        args = yaml.safe_load((run / 'args.yaml').read_text())
        assert (args['mean'], args['std']) == (list(FASHION.mean), list(FASHION.std)), name
        assert (args['crop_pct'], args['interpolation']) == (FASHION.crop_pct, FASHION.interpolation)
        assert args['num_classes'] == 10 and args['input_size'] == [1, 28, 28]
        assert metrics['top1'] >= 0 and (run / 'model_best.pth.tar').is_file()


def test_dataset_normalization_only_for_fresh_models():
    def resolved(*argv):
        args = train.parse_args(['--dataset', 'torch/fashion_mnist', '--data-dir', 'x', *argv])
        train.resolve_defaults(args)
        return args
    fresh = resolved()
    assert (fresh.mean, fresh.std, fresh.crop_pct, fresh.interpolation) == (
        list(FASHION.mean), list(FASHION.std), FASHION.crop_pct, FASHION.interpolation)
    given = resolved('--mean', '0.5', '--crop-pct', '0.9')
    assert given.mean == [0.5] and given.std == list(FASHION.std) and given.crop_pct == 0.9
    for start in (['--pretrained'], ['--initial-checkpoint', 'start.pth.tar']):  # the weights' cfg, as timm does
        args = resolved(*start)
        assert (args.mean, args.std, args.crop_pct, args.interpolation) == (None, None, None, '')
    assert resolved('--dataset', 'torch/cifar10').mean == [0.4914, 0.4822, 0.4465]
    folder = train.parse_args(['--data-dir', 'x'])
    train.resolve_defaults(folder)
    assert folder.mean is None  # an image folder is not in the table: the model's cfg
    structured = train.parse_args(['--dataset', 'structured', '--pretrained'])
    train.resolve_defaults(structured)
    assert structured.mean == [0.5] * 3  # its pixels encode the patch values: always its own normalization


@pytest.mark.parametrize('argv, expected', [
    (['--data-dir', '/nonexistent/fashion'], 'apt-get install dataset-fashion-mnist'),
    (['--data-dir', '{data}', '--mean', '0.5', '0.5', '0.5'], '--mean has 3 values: expected 1 or one per input'),
    (['--data-dir', '{data}', '--initial-checkpoint', '{start}'], "the model's pretrained cfg normalizes 3 channels"),
    (['--data-dir', '{damaged}'], 'not a complete gzip file'),
])
def test_train_errors_are_one_line_and_write_nothing(data, runs, tmp_path, capsys, argv, expected):
    damaged = write_dataset(tmp_path / 'damaged', n_train=16, n_test=8)
    images = split_file(damaged, train=True)
    images.write_bytes(images.read_bytes()[:200])
    fill = {'{data}': str(data), '{damaged}': str(damaged), '{start}': str(runs['posattn'][0] / 'last.pth.tar')}
    argv = [fill.get(a, a) for a in argv]
    code = train.run([*COMMON, *POSATTN, *argv, '--output', str(tmp_path / 'out')])
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert not (tmp_path / 'out').exists()


def run_validate(capsys, *argv):
    code = validate.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_reproduces_the_runs_evaluation(data, runs, capsys, tmp_path):
    """validate.py on each checkpoint gives the top-1 train.py logged: same data, preprocessing, weights; a torchvision
    layout with plain files is the same data."""
    plain = write_dataset(tmp_path / 'tv', n_train=64, n_test=32, gz=False, layout='torchvision')
    for name, (run, metrics) in runs.items():
        for root in (data, plain):
            results = tmp_path / f'{name}-{root.name}.json'
            code, out, err = run_validate(capsys, '--checkpoint', run / 'last.pth.tar', '--data-dir', root,
                                          '--results-file', results, '-j', '0')
            assert code == 0, err
            measured = json.loads(results.read_text())
            assert measured['num_samples'] == 32 and measured['dataset'] == 'torch/fashion_mnist'
            assert measured['top1'] == pytest.approx(metrics['top1'], abs=1e-3), name


def test_validate_mean_std_one_value_or_one_per_channel(data, runs, capsys, tmp_path):
    ckpt = runs['posattn'][0] / 'last.pth.tar'
    code, out, err = run_validate(capsys, '--checkpoint', ckpt, '--data-dir', data, '--mean', '0.2', '--std', '0.4',
                                  '-j', '0')
    assert code == 0, err
    for argv, expected in ((['--mean', '0.2', '0.2', '0.2'], 'mean has 3 values (given) but the model takes 1'),
                           (['--std', '0'], 'out of range'),
                           (['--input-size', '3', '28', '28'], 'the model takes 1-channel inputs, not 3'),
                           (['--data-dir', tmp_path / 'missing'], 'apt-get install dataset-fashion-mnist')):
        code, out, err = run_validate(capsys, '--checkpoint', ckpt, '--data-dir', data, *argv, '-j', '0',
                                      '--results-file', tmp_path / 'r.json')
        assert_one_line_error(code, err, expected)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('name', ['standard', 'timm_vit'])
def test_convert_a_one_channel_standard_vit(data, runs, tmp_path, capsys, name, one_thread):
    """The standard twin and timm's ViT, both 1 x 28 x 28: converted on the Fashion-MNIST images with their recorded
    normalization; the printed train.py line trains from the converted checkpoint as it is."""
    from timm_posattn import convert
    run, _ = runs[name]
    out = tmp_path / 'converted'
    report = convert.main(['--source', str(run / 'model_best.pth.tar'), '--dataset', 'torch/fashion_mnist',
                           '--data-dir', str(data), '--num-images', '24', '--fit-steps', '5', '-j', '0', '-b', '8',
                           '--device', 'cpu', '--out', str(out)])
    printed = capsys.readouterr().out
    assert report['arch'] == 'vit_posattn_tiny_patch4_32'  # the architecture with a 28 px tag (.fashion_mnist)
    assert (report['model_kwargs']['in_chans'], report['model_kwargs']['img_size']) == (1, 28)
    assert list(report['data_config']['input_size']) == [1, 28, 28]
    assert list(report['data_config']['mean']) == list(FASHION.mean)  # as the source was trained, one channel
    assert (report['num_calibration_images'], report['num_holdout_images']) == (20, 4) and report['top1']
    flags = next(line for line in printed.splitlines() if line.startswith('train from it: python train.py '))
    argv = flags.split('train.py ', 1)[1].split()
    assert argv[argv.index('--input-size') + 1:argv.index('--input-size') + 4] == ['1', '28', '28']
    result = train.main([*argv, '--dataset', 'torch/fashion_mnist', '--data-dir', str(data), '--epochs', '1', '-j',
                         '0', '-b', '16', '--output', str(tmp_path), '--experiment', 'from_converted',
                         '--no-attention-plot'])
    assert result['eval'] is not None


def test_convert_missing_data_folder_is_one_line(runs, tmp_path, capsys):
    from timm_posattn import convert
    code = convert.run(['--source', str(runs['standard'][0] / 'model_best.pth.tar'), '--dataset',
                        'torch/fashion_mnist', '--data-dir', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o')])
    assert_one_line_error(code, capsys.readouterr().err, 'apt-get install dataset-fashion-mnist')
    assert list(tmp_path.iterdir()) == []


def _naive_distance(attn, grid, prefix=1):
    """Per head: the mean over patch queries of sum_j A_ij * |pos_i - pos_j|, loop by loop from the definition."""
    gh, gw = grid
    heads = []
    for a in attn.detach().double():
        total = 0.0
        for i in range(gh * gw):
            for j in range(gh * gw):
                total += float(a[prefix + i, prefix + j]) * ((i // gw - j // gw) ** 2 + (i % gw - j % gw) ** 2) ** 0.5
        heads.append(total / (gh * gw))
    return heads


def _test_images():
    """The 32 test images as the eval loader gives them: 28 px is the native size and crop_pct is 1, so only the
    normalization changes them."""
    from idx_files import make_split
    images, _ = make_split(32, seed=1)  # what write_dataset wrote for t10k
    return ((images.float() / 255 - FASHION.mean[0]) / FASHION.std[0]).unsqueeze(1)


def run_visualize(capsys, *argv):
    from timm_posattn.visualize import run as main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _sharpened(run, path):
    """The run's checkpoint with queries and keys scaled up: peaked attention, far from the near-uniform attention
    of one epoch, and (standard blocks) strongly image-dependent, so that the numbers below have something to
    miss."""
    from timm_posattn.loading import make_checkpoint, read_checkpoint
    ckpt = read_checkpoint(run / 'last.pth.tar')
    state = {k: v.clone() for k, v in ckpt.state_dict.items()}
    for key, value in state.items():
        if key.endswith('attn.pos_map.qk.weight'):
            value.mul_(30)
        elif key.endswith('attn.qkv.weight'):
            value[:2 * value.shape[1]].mul_(30)
    torch.save(make_checkpoint(ckpt.arch, ckpt.epoch, state, args=ckpt.args), path)
    return path


@pytest.mark.parametrize('twin', ['standard', 'timm_vit'])
def test_distance_figure_and_numbers(data, runs, tmp_path, capsys, twin):
    """Positional model: distances of its A (no image); twin: of its attention averaged over the 32 test images; both
    against the uniform row, checked against the definition computed loop by loop."""
    from timm_posattn.loading import load_model
    pos_ckpt = _sharpened(runs['posattn'][0], tmp_path / 'pos.pth.tar')
    twin_ckpt = _sharpened(runs[twin][0], tmp_path / 'twin.pth.tar')
    (tmp_path / 'notes.txt').write_text('mine')
    code, out, err = run_visualize(capsys, pos_ckpt, '--distance', '--twin', twin_ckpt, '--data-dir', data,
                                   '--out', tmp_path / 'fm.png', '-j', '0', '-b', '10')
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob('[fn]*')) == ['fm.json', 'fm.png', 'notes.txt']
    assert (tmp_path / 'fm.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    report = json.loads((tmp_path / 'fm.json').read_text())
    assert (report['dataset'], report['split']) == ('torch/fashion_mnist', 'test')
    model_entry, twin_entry = report['models']
    uniform = _naive_distance(torch.full((1, 50, 50), 1 / 50), (7, 7))[0]
    positional = load_model(str(pos_ckpt)).model.eval()
    expected = _naive_distance(positional.get_attention_maps()[0], (7, 7))
    assert model_entry['blocks'][0]['heads'] == pytest.approx(expected, abs=1e-5)
    assert model_entry['images'] == 0 and model_entry['positional_blocks'] == [0, 1]
    standard = load_model(str(twin_ckpt)).model.eval()
    by_hand = attention_by_hand(standard, _test_images())
    for block, attn in enumerate(by_hand):
        assert twin_entry['blocks'][block]['heads'] == pytest.approx(_naive_distance(attn, (7, 7)), abs=1e-4)
    assert twin_entry['images'] == 32 and twin_entry['positional_blocks'] == []
    for entry in report['models']:
        assert entry['uniform_row_distance'] == pytest.approx(uniform, abs=1e-6)
        assert max(abs(d - uniform) for b in entry['blocks'] for d in b['heads']) > 0.3  # not near-uniform
    assert 'twin: mean distance per block' in out

    code, _, err = run_visualize(capsys, pos_ckpt, '--distance', '--out', tmp_path / 'fm.png')
    assert_one_line_error(code, err, 'fm.json, fm.png', '--overwrite')
    assert (tmp_path / 'notes.txt').read_text() == 'mine'


def test_distance_of_a_positional_model_needs_no_data(runs, tmp_path, capsys):
    code, out, err = run_visualize(capsys, runs['posattn'][0] / 'last.pth.tar', '--distance', '--out',
                                   tmp_path / 'd.png', '--query', '0,6', '--blocks', '1')
    assert code == 0, err
    report = json.loads((tmp_path / 'd.json').read_text())
    assert 'dataset' not in report and report['query_patch'] == [0, 6] and len(report['models']) == 1


@pytest.mark.parametrize('argv, expected', [
    (['--distance', '--twin', '{std}', '--data-dir', '{tmp}/missing'], 'apt-get install dataset-fashion-mnist'),
    (['--distance', '--twin', '{std}', '--data-dir', '{damaged}'], 'not a complete gzip file'),
    (['--distance', '--data-dir', '{data}'], 'every block here is positional'),
    (['--dataset', 'torch/fashion_mnist'], '--dataset applies only to --distance'),
    (['--distance', '--img-size', '32'], '--img-size applies to the attention plot'),
    (['--distance', '--blocks', '5'], '--blocks [5]: the model has blocks 0..1'),
    (['--distance', '--query', '7,0'], 'inside the 7x7 grid'),
    (['--distance', '--twin', '{std}', '--num-images', '0'], 'out of range'),
    (['--distance', '--twin', 'resnet10t'], 'twin: expected a ViT'),
])
def test_distance_errors_are_one_line_and_write_nothing(data, runs, tmp_path, capsys, argv, expected):
    damaged = write_dataset(tmp_path / 'damaged', n_train=8, n_test=8)
    images = split_file(damaged, train=False)
    images.write_bytes(images.read_bytes()[:100])
    fill = {'{std}': str(runs['standard'][0] / 'last.pth.tar'), '{data}': str(data), '{damaged}': str(damaged)}
    argv = [fill.get(a, a).replace('{tmp}', str(tmp_path)) for a in argv]
    code, _, err = run_visualize(capsys, runs['posattn'][0] / 'last.pth.tar', *argv, '--out', tmp_path / 'o' / 'd.png')
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / 'o').exists()


def test_publish_card_reports_the_accuracy_of_the_published_weights(data, runs, tmp_path, capsys):
    """publish --dataset evaluates the folder it wrote with validate.py's code: validate.py on that folder gives the
    card's numbers, and the card names the split (Fashion-MNIST's test set) and its number of images."""
    from huggingface_hub import ModelCard
    from timm_posattn import publish
    run = runs['posattn'][0]
    out = tmp_path / 'published'
    code = publish.run(['--checkpoint', str(run / 'model_best.pth.tar'), '--model',
                         'vit_posattn_tiny_patch4_32.fashion_mnist', '--out', str(out), '--no-benchmark',
                         '--results', str(run / 'summary.csv'), '--dataset', 'torch/fashion_mnist', '--data-dir',
                         str(data), '-j', '0'])
    printed = capsys.readouterr().out
    assert code == 0
    assert 'Evaluated the published weights on torch/fashion_mnist/test (32 images)' in printed
    config = json.loads((out / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [1, 28, 28] and config['pretrained_cfg']['mean'] == [0.286]
    code, _, err = run_validate(capsys, '--model', f'local-dir:{out}', '--dataset', 'torch/fashion_mnist',
                                '--data-dir', data, '-j', '0', '--results-file', tmp_path / 'v.json')
    assert code == 0, err
    validated = json.loads((tmp_path / 'v.json').read_text())
    card = ModelCard((out / 'README.md').read_text())
    top1, top5 = card.data.eval_results
    assert (top1.metric_value, top5.metric_value) == (validated['top1'], validated['top5'])
    assert (top1.dataset_split, top1.dataset_name, top1.dataset_type) == (
        'test', 'Fashion-MNIST', 'zalando-datasets/fashion_mnist')
    assert (f"| Top-1 accuracy (%) | {validated['top1']:.2f} | the published weights (this folder's "
            f"model.safetensors)") in card.text
    assert '`test` split of Fashion-MNIST, 32 images' in card.text
    assert '| Top-1 accuracy (%), training log |' in card.text and '1x28x28 inputs, 4x4 patches' in card.text
    assert 'train.py evaluation on the `test` split' in card.text  # its --val-split validation is the test set


@pytest.mark.parametrize('argv, expected', [
    (['--dataset', 'torch/fashion_mnist', '--data-dir', '{tmp}/missing'], 'apt-get install dataset-fashion-mnist'),
    (['--dataset', 'torch/fashion_mnist', '--data-dir', '{damaged}'], 'not a complete gzip file'),
    (['--dataset', 'torch/mnist', '--data-dir', '{tmp}/missing'], '--dataset-download'),
    (['--workers', '-1'], 'out of range'),
])
def test_publish_data_errors_are_one_line_and_write_nothing(runs, tmp_path, capsys, argv, expected):
    from timm_posattn import publish
    damaged = write_dataset(tmp_path / 'damaged', n_train=8, n_test=8)
    labels = split_file(damaged, train=False, what='labels')
    labels.write_bytes(b'not gzip')
    argv = [a.replace('{tmp}', str(tmp_path)).replace('{damaged}', str(damaged)) for a in argv]
    out = tmp_path / 'out'
    out.mkdir()
    code = publish.run(['--checkpoint', str(runs['posattn'][0] / 'last.pth.tar'), '--model',
                         'vit_posattn_tiny_patch4_32', '--out', str(out), '--no-benchmark', *argv])
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert list(out.iterdir()) == []


def test_published_fashion_mnist_weights_load_through_the_registered_tag(tmp_path, one_thread):
    """A checkpoint of the tag's own shape (the default tiny model at 1 x 28 x 28) published as
    `vit_posattn_tiny_patch4_32.fashion_mnist`: publish finds that the registered tag rebuilds it (a releases.json
    entry would be offered), and `create_model(tag, pretrained=True)` gives its logits from the published file."""
    import timm
    from timm_posattn import publish
    from timm_posattn.loading import make_checkpoint
    tag = 'vit_posattn_tiny_patch4_32.fashion_mnist'
    torch.manual_seed(0)
    model = timm.create_model(tag).eval()
    args = dict(model='vit_posattn_tiny_patch4_32', dataset='torch/fashion_mnist', num_classes=10,
                input_size=[1, 28, 28], mean=list(FASHION.mean), std=list(FASHION.std), crop_pct=1.0,
                interpolation='bilinear', model_kwargs={'pos_attn_blocks': 'all'})
    torch.save(make_checkpoint('vit_posattn_tiny_patch4_32', 9, model.state_dict(), args=args),
               tmp_path / 'ckpt.pth.tar')
    summary = publish.publish(str(tmp_path / 'ckpt.pth.tar'), tag, str(tmp_path / 'pub'), benchmark=False)
    assert summary['tag_mismatch'] is None
    loaded = timm.create_model(tag, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'pub' / 'model.safetensors'))).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    other = publish.tag_rebuilds_model(model, 'vit_posattn_tiny_patch4_32.cifar10', (1, 28, 28))
    assert 'do not fit' in other  # the 3 x 32 x 32 tag cannot take them


def test_comparison_table_reads_each_runs_attention_and_top1(runs, tmp_path, capsys):
    sys.path.insert(0, str(REPO / 'benchmarks'))
    import fashion_mnist_table
    rows = fashion_mnist_table.main([str(runs[name][0]) for name in ('posattn', 'standard', 'timm_vit')])
    assert [r['attention'] for r in rows] == ['positional (qk)', 'standard (our twin)', 'standard (timm ViT)']
    for row, name in zip(rows, ('posattn', 'standard', 'timm_vit')):
        assert row['final_top1'] == round(runs[name][1]['top1'], 2) and row['epochs'] == 1
    assert '| posattn | positional (qk) |' in capsys.readouterr().out
    assert fashion_mnist_table.run([str(tmp_path)]) == 2  # not a run folder: one line
