"""timm_posattn.convert: positional ViTs from standard ViTs (tiny models: depth 2, width 48, 32 px, few images)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import timm

import timm_posattn  # noqa: F401  registers vit_posattn_*
from attention_by_hand import attention_by_hand
from timm_posattn import convert
from timm_posattn.convert import (
    ConvertError, attention_distance, attention_kl, convert_vit, fit_attention, record_average_attention, twin_kwargs)
from timm_posattn.dataset_info import STRUCTURED_MEAN, STRUCTURED_STD
from timm_posattn.loading import load_model, make_checkpoint, read_checkpoint
from timm_posattn.outputs import LOCK_NAME, manifest_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2, num_classes=4)
POSATTN = 'vit_posattn_tiny_patch4_32'


def _timm_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', **{**TINY, **kwargs}).eval()


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_recorded_average_is_the_source_attention(one_thread):
    """Fused attention (the default) does not hide the maps; uneven batches are weighted by their images; a block
    whose queries and keys are zero attends uniformly; the source is left as it was."""
    source = _timm_vit()
    C = TINY['embed_dim']
    with torch.no_grad():
        source.blocks[0].attn.qkv.weight[:2 * C].mul_(20)  # peaked, image-dependent attention
        # block 1: q = k = 0, so its attention is exactly uniform whatever the image
        source.blocks[1].attn.qkv.weight[:2 * C].zero_()
        source.blocks[1].attn.qkv.bias[:2 * C].zero_()
    assert all(blk.attn.fused_attn for blk in source.blocks)
    images = _images(7)
    average, count, image_kl = record_average_attention(source, [images[:5], images[5:]])
    assert count == 7 and average.shape == (2, 3, 65, 65)
    per_image = attention_by_hand(source, images, mean=False)
    torch.testing.assert_close(average, per_image.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(average[1], torch.full_like(average[1], 1 / 65))
    assert average[0].max() > 2 / 65  # block 0 is not uniform: the comparison above has something to compare
    # the image-dependent part: the mean over images of KL(A(x) || average), 0 for the image-independent block 1
    expected_kl = torch.stack([attention_kl(per_image[:, i], average.log()) for i in range(7)]).mean(0)
    torch.testing.assert_close(image_kl, expected_kl, atol=1e-6, rtol=1e-4)
    assert image_kl[0] > 0.01 and image_kl[1] < 1e-7
    assert all(blk.attn.fused_attn for blk in source.blocks)
    assert not any(m._forward_hooks for m in source.modules())


@pytest.mark.parametrize('layer', ['qk', 'tied', 'logits'])
def test_fit_recovers_the_attention_of_a_positional_model(layer, one_thread):
    """Target: the attention of another positional model of the same shape (same P, its own peaked pos_map)."""
    kwargs = dict(TINY, pos_attn_layer=layer)
    torch.manual_seed(0)
    teacher = timm.create_model(POSATTN, **kwargs)
    with torch.no_grad():
        teacher.pos_embed.normal_()
        for blk in teacher.blocks:
            for p in blk.attn.pos_map.parameters():
                p.add_(torch.randn_like(p) * 2) if layer == 'logits' else p.mul_(6 if p.ndim > 1 else 1)
    target = teacher.get_attention_maps()
    torch.manual_seed(1)
    student = timm.create_model(POSATTN, **kwargs)
    with torch.no_grad():
        student.pos_embed.copy_(teacher.pos_embed)
    before, after = fit_attention(student, target, steps=150, lr=3e-2)
    assert before.min() > 0.1  # the fresh attention is far from the target
    assert after.max() < 2e-3, (before, after)
    torch.testing.assert_close(student.get_attention_maps(), target, atol=2e-2, rtol=0)
    assert torch.equal(student.pos_embed, teacher.pos_embed)  # P is never moved


def test_attention_distance():
    grid = (1, 2)  # two patches one apart, plus a class token
    uniform = torch.full((3, 3), 1 / 3)
    assert float(attention_distance(uniform, grid)) == pytest.approx(1 / 3)  # the class token's third counts 0
    assert float(attention_distance(torch.eye(3), grid)) == 0
    far = torch.tensor([[1., 0, 0], [0, 0, 1], [0, 1, 0]])
    assert float(attention_distance(far, grid)) == 1


def test_convert_timm_vit(one_thread):
    """Copy, fit and report; held-out images are measured, not averaged."""
    source = _timm_vit()
    images = _images(10)
    model, report = convert_vit(source, images, fit_steps=30, fit_lr=3e-2, holdout=0.2, batch_size=4)
    assert isinstance(model, timm_posattn.VisionTransformerPosAttn) and model.pos_attn_indices == [0, 1]
    state = source.state_dict()
    for name, value in model.state_dict().items():  # everything but Q/K (and the positional maps) is copied
        if name.endswith('attn.v.weight'):
            assert torch.equal(value, state[name.replace('attn.v.', 'attn.qkv.')][2 * 48:])
        elif name in state:
            assert torch.equal(value, state[name]), name
    assert (report.num_calibration_images, report.num_holdout_images) == (8, 2)
    held_out = torch.tensor([i for i in range(10) if (i + 1) // 5 > i // 5])
    calibration = torch.tensor([i for i in range(10) if i not in held_out])
    torch.testing.assert_close(report.source_attention, attention_by_hand(source, images[calibration]),
                               atol=1e-6, rtol=1e-5)
    assert [b['block'] for b in report.blocks] == [0, 1]
    assert all(b['kl_after'] < b['kl_before'] for b in report.blocks)
    assert set(report.agreement) == {'copy_only', 'fitted'} and report.top1 is None  # no labels given
    assert report.fit['moved'] == ['blocks.*.attn.pos_map.norm.bias', 'blocks.*.attn.pos_map.norm.weight',
                                   'blocks.*.attn.pos_map.qk.bias', 'blocks.*.attn.pos_map.qk.weight']
    json.dumps(report.to_dict())


def test_convert_refuses_what_it_cannot_mirror(one_thread):
    with pytest.raises(ConvertError, match=r'register tokens.*qk_norm'):
        twin_kwargs(_timm_vit(reg_tokens=2, qk_norm=True))
    with pytest.raises(ConvertError, match='gives other logits'):  # an activation the twin does not have
        convert_vit(_timm_vit(act_layer='relu'), _images(2))
    with pytest.raises(ConvertError, match='already has positional attention'):
        twin_kwargs(timm.create_model(POSATTN, **TINY))
    with pytest.raises(ConvertError, match='ResNet'):
        twin_kwargs(timm.create_model('resnet10t'))


def _standard_checkpoint(tmp_path):
    """A train.py-style checkpoint of our standard twin, trained (as far as the test cares) on `structured`."""
    torch.manual_seed(0)
    model_kwargs = dict(pos_attn_blocks='none', depth=2, embed_dim=48, num_heads=3)
    model = timm.create_model(POSATTN, num_classes=2, **model_kwargs)
    args = dict(model=POSATTN, model_kwargs=model_kwargs, num_classes=2, dataset='structured', data_seed=0,
                mean=list(STRUCTURED_MEAN), std=list(STRUCTURED_STD), crop_pct=1.0)
    path = tmp_path / 'source.pth.tar'
    torch.save(make_checkpoint(POSATTN, 3, model.state_dict(), args=args), path)
    return path, model


def test_written_checkpoint_loads_with_the_same_logits(tmp_path, one_thread):
    path, source = _standard_checkpoint(tmp_path)
    model, report = convert_vit(str(path), _images(6), pos_attn_layer='tied', fit_steps=10)
    with convert.output_folder(str(tmp_path / 'out')).claim() as claim:
        convert.write_conversion(claim, model, report, convert.checkpoint_args(report))
    loaded = load_model(str(tmp_path / 'out' / convert.CHECKPOINT_NAME)).model.eval()
    assert type(loaded.blocks[0].attn.pos_map).__name__ == 'TiedAttentionMap'
    images = _images(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
    # the normalization the source checkpoint recorded: on the model, and in the checkpoint's args as train.py's
    assert model.pretrained_cfg['mean'] == pytest.approx(STRUCTURED_MEAN)
    assert read_checkpoint(tmp_path / 'out' / convert.CHECKPOINT_NAME).args['std'] == pytest.approx(STRUCTURED_STD)


def test_command_writes_checkpoint_report_and_plot(tmp_path, one_thread, capsys):
    path, source = _standard_checkpoint(tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    argv = ['--source', str(path), '--dataset', 'structured', '--num-images', '20', '--fit-steps', '20',
            '--out', str(out), '-j', '0', '-b', '8', '--device', 'cpu']
    report = convert.main(argv)
    assert sorted(os.listdir(out)) == sorted([LOCK_NAME, manifest_name('convert'), 'attention.png',
                                              'converted.pth.tar', 'notes.txt', 'report.json'])
    assert json.loads((out / 'report.json').read_text()) == json.loads(json.dumps(report))
    assert (report['num_calibration_images'], report['num_holdout_images']) == (16, 4)
    assert set(report['top1']) == {'source', 'copy_only', 'fitted'}  # structured brings labels
    loaded = load_model(str(out / 'converted.pth.tar')).model
    args = read_checkpoint(out / 'converted.pth.tar').args  # the source checkpoint's normalization and data
    assert (args['mean'], args['std'], args['dataset'], args['data_seed']) == (
        pytest.approx(STRUCTURED_MEAN), pytest.approx(STRUCTURED_STD), 'structured', 0)
    distances = attention_distance(loaded.get_attention_maps(), (8, 8)).mean(-1)
    assert distances.tolist() == pytest.approx([b['distance_fitted'] for b in report['blocks']], abs=1e-4)

    assert convert.run(argv) == 2  # the files exist: refused, nothing touched
    assert 'pass --overwrite' in capsys.readouterr().err
    assert convert.run(argv + ['--overwrite']) == 0
    assert (out / 'notes.txt').read_text() == 'mine'


def _base_argv(tmp_path):
    return ['--source', 'vit_tiny_patch16_224', '--dataset', 'structured', '--out', str(tmp_path / 'o'), '-j', '0']


def test_command_error_is_one_line_in_a_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'timm_posattn.convert', *_base_argv(tmp_path), '--source', 'no_such_model_xyz'],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT, 'HF_HUB_OFFLINE': '1'})
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: unknown model architecture') and result.stderr.count('\n') == 1
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('argv, message', [
    (['--num-images', '0'], 'out of range'),
    (['--holdout', '1'], 'out of range'),
    (['--pos-attn-layer', 'nope'], 'invalid choice'),
    (['--pos-attn-blocks', 'x'], 'block count'),
    (['--device', 'gpu0'], 'expected a device such as cpu, cuda or cuda:0'),
    (['--source', 'resnet10t'], 'cannot convert a ResNet'),
    (['--dataset', '', '--data-dir', '/no/such/dir'], "does not exist"),
    (['--pos-attn-blocks', '0,99'], 'outside 0..11'),
])
def test_command_errors_are_one_line(tmp_path, capsys, argv, message):
    try:
        code = convert.run(_base_argv(tmp_path) + argv + ['--num-images', '4'] * (argv[0] != '--num-images'))
    except SystemExit as e:  # argparse errors exit from the parser
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
    assert not (tmp_path / 'o').exists()
