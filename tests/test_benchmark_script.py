""" Smoke tests of benchmarks/throughput.py: tiny models, one repeat, the JSON schema and the checks that keep the
comparison fair. No timing is asserted (that would be a flaky test of the machine, not of the script).
"""
import importlib.util
import json
import os

import pytest
import torch

import timm
import timm_posattn  # noqa: F401  registers the vit_posattn_* models
from timm_posattn.cli import UsageError

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'throughput.py')
TINY = 'vit_posattn_tiny_patch4_32'
TINY_KWARGS = dict(depth=2)


def _load_script(name='throughput'):
    """Import benchmarks/NAME.py (the benchmarks folder is not a package)."""
    path = os.path.join(os.path.dirname(SCRIPT), f'{name}.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _load_script()


pytestmark = pytest.mark.usefixtures('one_thread')


def _check_row(row, mode, batch_size, variant='posattn', img_size=32, tokens=65):
    for key in throughput.ROW_KEYS:
        assert key in row, f'row lacks {key}'
    assert row['mode'] == mode and row['variant'] == variant
    assert row['img_size'] == img_size and row['tokens'] == tokens
    assert row['device'] == 'cpu' and row['dtype'] == 'float32' and row['batch_size'] == batch_size
    assert row['img_per_s'] > 0 and row['baseline_img_per_s'] > 0
    assert row['ratio'] == pytest.approx(row['img_per_s'] / row['baseline_img_per_s'], rel=1e-2)
    assert row['memory_method'] == 'cpu_allocator_peak_torch_profiler'
    assert row['num_threads'] == 1
    # Peak of a step holds at least the parameters (and, training, their gradients and two AdamW moments).
    param_mb = row['param_count'] * 4 / 2 ** 20
    assert row['peak_mem_mb'] > (4 if mode == 'train' else 1) * param_mb
    assert row['baseline_peak_mem_mb'] > 0
    assert row['mem_ratio'] == pytest.approx(row['peak_mem_bytes'] / row['baseline_peak_mem_bytes'], abs=5e-5)
    assert row['peak_mem_mb'] == pytest.approx(row['peak_mem_bytes'] / 2 ** 20, abs=0.005)
    assert len(row['seconds_per_repeat']) == len(row['baseline_seconds_per_repeat']) == row['repeats']
    assert row['paired_ratios'] == [pytest.approx(b / a, rel=1e-2) for a, b in zip(
        row['seconds_per_repeat'], row['baseline_seconds_per_repeat'])]
    assert row['flop_ratio'] == pytest.approx(row['baseline_gflops_per_img'] / row['gflops_per_img'], rel=1e-2)
    assert row['ratio_of_bound'] == pytest.approx(row['ratio'] / row['flop_ratio'], rel=1e-2)
    json.dumps(row)  # every value serializable


def test_benchmark_pair_rows_schema():
    rows = throughput.benchmark_pair(TINY, batch_size=2, warmup=1, repeats=1, model_kwargs=TINY_KWARGS)
    assert [r['mode'] for r in rows] == ['infer', 'train']
    for row, mode in zip(rows, ('infer', 'train')):
        _check_row(row, mode, 2)
        assert row['model'] == TINY
        assert row['baseline'].startswith('vit_tiny_patch16_224(')
        assert 'img_size=32' in row['baseline'] and 'patch_size=4' in row['baseline'] and 'depth=2' in row['baseline']
        assert row['model_kwargs'] == {'depth': '2'}
        assert row['speed_vs_posattn'] is None


def test_reparameterized_variant_is_timed_in_the_same_round():
    """Batch sizes per mode, and the reparameterized model next to the plain one where asked (inference only)."""
    rows = throughput.benchmark_pair(TINY, batch_size=[1, 3], train_batch_size=2, reparam_batch_size=[3], warmup=1,
                                     repeats=2, model_kwargs=TINY_KWARGS)
    assert [(r['mode'], r['batch_size'], r['variant']) for r in rows] == [
        ('infer', 1, 'posattn'), ('infer', 3, 'posattn'), ('infer', 3, 'reparam'), ('train', 2, 'posattn')]
    plain, reparam = rows[1], rows[2]
    _check_row(reparam, 'infer', 3, variant='reparam')
    assert reparam['baseline_seconds_per_repeat'] == plain['baseline_seconds_per_repeat']  # one round, one baseline
    assert reparam['speed_vs_posattn'] == pytest.approx(reparam['img_per_s'] / plain['img_per_s'], rel=1e-2)
    # the baked model computes no attention from the positional table: fewer FLOPs than the plain model
    assert reparam['gflops_per_img'] < plain['gflops_per_img']
    assert reparam['param_count'] == plain['param_count']  # the pair's figures describe the model as built
    assert throughput.default_reparam_batch_sizes([8, 1, 32]) == (1, 32)
    assert throughput.default_batch_sizes((224, 224), 'infer') == (1, 8, 32)
    assert throughput.default_batch_sizes((224, 224), 'train') == (8,)
    assert throughput.default_batch_sizes((32, 32), 'train') == (128,)


def test_compiled_rounds_report_compile_seconds(monkeypatch):
    """--compile: both models of a round compiled alike (here aot_eager, to skip code generation), their first calls'
    seconds reported, memory measured once compiled, the table showing both."""
    compiled = []
    real_compile = torch.compile

    def compile_(model, **kwargs):
        compiled.append(kwargs)
        return real_compile(model, backend='aot_eager', **kwargs)
    monkeypatch.setattr(torch, 'compile', compile_)
    rows = throughput.benchmark_pair(TINY, batch_size=2, reparam_batch_size=(), warmup=2, repeats=1,
                                     compile_model=True, model_kwargs=TINY_KWARGS)
    assert compiled == [dict(dynamic=False)] * 4  # ours and timm's, inference and training
    for row, mode in zip(rows, ('infer', 'train')):
        _check_row(row, mode, 2)
        assert row['compile'] and row['compile_s'] > 0 and row['baseline_compile_s'] > 0
    table = throughput.markdown_table(rows).splitlines()
    assert table[0].endswith('| mem ratio | compile s | baseline compile s |')
    assert table[2].endswith(f"| {rows[0]['compile_s']:.1f} | {rows[0]['baseline_compile_s']:.1f} |")


def test_image_size_sweep_builds_model_and_baseline_for_each_size():
    rows = throughput.benchmark_pair(TINY, modes=['infer'], batch_size=2, img_size=48, warmup=1, repeats=1,
                                     measure_memory=False, model_kwargs=TINY_KWARGS, timer='process')
    assert len(rows) == 1
    row = rows[0]
    assert row['timer'] == 'process' and row['seconds_per_repeat'][0] > 0
    with pytest.raises(ValueError, match="'process' on the cpu"):
        throughput.benchmark_pair(TINY, device='cuda', timer='process', model_kwargs=TINY_KWARGS)
    assert row['img_size'] == 48 and row['tokens'] == 1 + 12 * 12
    assert 'img_size=48' in row['baseline'] and row['model_kwargs']['img_size'] == '48'
    assert row['peak_mem_mb'] is None and row['mem_ratio'] is None
    with pytest.raises(ValueError, match='either as img_size or in model_kwargs'):
        throughput.benchmark_pair(TINY, img_size=48, model_kwargs=dict(img_size=32))


def test_timm_baseline_has_identical_architecture():
    model = timm.create_model(TINY, **TINY_KWARGS)
    baseline, label = throughput.create_baseline(TINY, model, 'timm', TINY_KWARGS)
    assert type(baseline).__name__ == 'VisionTransformer'
    assert throughput.vit_arch_kwargs(baseline) == throughput.vit_arch_kwargs(model)
    info = throughput.check_pair(model, baseline, 'timm')
    # Outside the attention modules the parameter counts are identical; only attention may differ.
    assert info['param_count'] - info['attn_param_count'] == info['baseline_param_count'] - info[
        'baseline_attn_param_count']
    assert label == ('vit_tiny_patch16_224(img_size=32, patch_size=4, num_classes=10, depth=2, num_heads=12, '
                     'mlp_ratio=1.0)')


def test_timm_baseline_name_for_224_models():
    assert throughput.timm_vit_name('vit_posattn_small_patch16_224') == 'vit_small_patch16_224'
    assert throughput.timm_vit_name('vit_posattn_base_patch16_224.in1k') == 'vit_base_patch16_224'
    assert throughput.timm_vit_name('vit_posattn_small_patch4_32') == 'vit_small_patch16_224'
    model = timm.create_model('vit_posattn_tiny_patch16_224', depth=1)
    _, label = throughput.create_baseline('vit_posattn_tiny_patch16_224', model, 'timm', dict(depth=1))
    assert label == 'vit_tiny_patch16_224(depth=1)'


def test_check_pair_rejects_mismatched_baseline():
    model = timm.create_model(TINY, **TINY_KWARGS)
    wider_mlp = timm.create_model(
        'vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_heads=12, mlp_ratio=2.0, num_classes=10)
    with pytest.raises(RuntimeError, match='mlp_ratio'):
        throughput.check_pair(model, wider_mlp, 'timm')


def test_twin_and_self_baselines():
    model = timm.create_model(TINY, **TINY_KWARGS)
    twin, label = throughput.create_baseline(TINY, model, 'twin', TINY_KWARGS)
    assert twin.pos_attn_indices == [] and model.pos_attn_indices == [0, 1]
    assert label == f'{TINY}(pos_attn_blocks=none)'
    throughput.check_pair(model, twin, 'twin')
    same, label = throughput.create_baseline(TINY, model, 'self', TINY_KWARGS)
    assert label == TINY
    info = throughput.check_pair(model, same, 'self')
    assert info['param_count'] == info['baseline_param_count']
    with pytest.raises(ValueError, match='twin needs a vit_posattn'):
        throughput.create_baseline('vit_tiny_patch16_224', timm.create_model('vit_tiny_patch16_224', depth=1),
                                   'twin', dict(depth=1))


def test_cpu_allocator_peak_counts_live_bytes():
    def allocate():
        a = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        b = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB: 8 MB live
        del a
        c = torch.empty(2_000_000, dtype=torch.float32)  # 8 MB: 12 MB live, the peak
        del b, c
        d = torch.empty(500_000, dtype=torch.float32)  # 2 MB after everything else was freed
        del d

    assert throughput.cpu_allocator_peak(allocate) == 12_000_000


def test_main_writes_json_plot_and_table(tmp_path, capsys):
    out, png = tmp_path / 'sub' / 'out.json', tmp_path / 'sub' / 'sweep.png'
    argv = ['--models', TINY, '--baseline', 'twin', '--img-size', '32', '48', '--batch-size', '3', '--repeats', '1',
            '--modes', 'infer', '--model-kwargs', 'depth=1', '--num-threads', '1', '--json', str(out),
            '--plot', str(png)]
    payload = throughput.main(argv)
    printed = capsys.readouterr().out
    assert '| model | variant | baseline | img | N | mode | batch |' in printed
    assert f'| {TINY} | posattn | {TINY}(pos_attn_blocks=none) | 32 | 65 | infer | 3 |' in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    assert set(saved) == {'environment', 'rows', 'targets', 'seconds_total'}
    assert saved['targets'] == []  # the issue's targets are for ViT-S/16 against timm's ViT
    for key in ('command', 'cpu', 'cpu_count', 'num_threads', 'torch', 'timm', 'timm_posattn', 'load_average',
                'load_average_end'):
        assert key in saved['environment']
    assert saved['environment']['command'].endswith('throughput.py ' + ' '.join(argv))
    # per size: the plain model, and the reparameterized one at the (only, so largest) batch
    assert [(r['img_size'], r['variant']) for r in saved['rows']] == [
        (32, 'posattn'), (32, 'reparam'), (48, 'posattn'), (48, 'reparam')]
    _check_row(saved['rows'][0], 'infer', 3)
    _check_row(saved['rows'][2], 'infer', 3, img_size=48, tokens=145)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(os.listdir(out.parent)) == ['out.json', 'sweep.png'], 'temp file left behind'
    # the files are the user's now: refused before any work unless --overwrite
    with pytest.raises(throughput.UsageError, match=r'already holds out.json, .* --overwrite'):
        throughput.main(argv)


def test_main_rejects_bad_input(capsys):
    with pytest.raises(throughput.UsageError, match='unknown model'):
        throughput.main(['--models', 'vit_posattn_nonexistent'])
    with pytest.raises(throughput.UsageError, match='not both'):
        throughput.main(['--models', TINY, '--img-size', '48', '--model-kwargs', 'img_size=32'])
    # a size the patches do not divide, or a kwarg typo, is refused before any size of the sweep is timed
    with pytest.raises(throughput.UsageError, match=r'cannot be built .*not divisible by patch_size'):
        throughput.main(['--models', TINY, '--img-size', '32', '33'])
    with pytest.raises(throughput.UsageError, match='cannot be built'):
        throughput.main(['--models', TINY, '--model-kwargs', 'depthh=2'])
    for bad in (['--batch-size', '0'], ['--img-size', '-1'], ['--repeats', '0'], ['--reparam-batch-size', 'x']):
        with pytest.raises(SystemExit) as exc:
            throughput.main(['--models', TINY] + bad)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith('error: argument ') and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match='dtype must be one of'):
        throughput.benchmark_pair(TINY, dtype='int8', model_kwargs=TINY_KWARGS)
    with pytest.raises(ValueError, match='repeats'):
        throughput.benchmark_pair(TINY, repeats=0, model_kwargs=TINY_KWARGS)
    with pytest.raises(ValueError, match='batch sizes must be >= 1'):
        throughput.benchmark_pair(TINY, batch_size=[2, 0], model_kwargs=TINY_KWARGS)


def test_targets_are_read_off_the_issue_rows():
    def row(variant, mode, img, batch, **metrics):
        return dict(model='vit_posattn_small_patch16_224', variant=variant, mode=mode, img_size=img, batch_size=batch,
                    baseline_kind='timm', device='cpu', dtype='float32', compile=False, ratio_of_bound=None,
                    mem_ratio=None, ratio=None, **{k: v for k, v in metrics.items()})
    rows = [
        dict(row('posattn', 'infer', 384, 8), ratio=1.2, ratio_of_bound=0.96, mem_ratio=1.01),
        dict(row('posattn', 'infer', 384, 1), ratio=1.0, ratio_of_bound=1.0, mem_ratio=0.99),  # no speed target at 1
        dict(row('posattn', 'train', 224, 8), ratio=1.1, ratio_of_bound=0.94, mem_ratio=0.9),
        dict(row('reparam', 'infer', 384, 1), ratio=1.09, ratio_of_bound=0.9, mem_ratio=2.0),
        dict(row('reparam', 'infer', 224, 1), ratio=1.0, ratio_of_bound=0.9, mem_ratio=1.5),
        dict(row('posattn', 'infer', 224, 8), ratio=9.0, ratio_of_bound=9.0, mem_ratio=9.0, baseline_kind='self'),
    ]
    results = throughput.check_targets(rows)
    got = {(r['target'].split(' (')[0].split(' >=')[0].split(' <=')[0], r['img_size'], r['batch_size']): r['met']
           for r in results}
    assert got == {
        ('inference speed ratio', 384, 8): True,
        ('inference peak memory', 384, 8): False,
        ('inference peak memory', 384, 1): True,
        ('training speed ratio', 224, 8): False,
        ('training peak memory', 224, 8): True,  # 0.9 is within "<= 0.9x"
        ('reparameterized batch-1 speed ratio', 384, 1): False,
        ('reparameterized batch-1 speed ratio', 224, 1): True,
    }
    text = throughput.targets_text(results)
    assert 'MISSED inference peak memory <= 1.0x: mem_ratio 1.01 at 384 px, batch 8' in text
    assert text.endswith('4 of 7 target checks met')


def test_compiled_rows_are_checked_against_the_compiled_targets():
    def row(mode, img, batch, **metrics):
        return dict(model='vit_posattn_small_patch16_224', variant='posattn', mode=mode, img_size=img,
                    batch_size=batch, baseline_kind='timm', device='cpu', dtype='float32', compile=True, **metrics)
    rows = [
        row('infer', 224, 8, ratio=1.2, ratio_of_bound=0.97, mem_ratio=1.02),
        row('infer', 384, 32, ratio=1.2, ratio_of_bound=0.94, mem_ratio=0.99),
        row('infer', 224, 1, ratio=1.0, ratio_of_bound=1.0, mem_ratio=1.1),  # no compiled target at batch 1
        row('train', 384, 8, ratio=1.2, ratio_of_bound=1.01, mem_ratio=0.91),
        row('train', 512, 8, ratio=1.2, ratio_of_bound=0.5, mem_ratio=2.0),  # nor at 512 px
    ]
    got = {(r['target'].split(' >=')[0].split(' <=')[0], r['img_size'], r['batch_size']): r['met']
           for r in throughput.check_targets(rows)}
    assert got == {
        ('compiled inference speed ratio', 224, 8): True,
        ('compiled inference peak memory', 224, 8): False,
        ('compiled inference speed ratio', 384, 32): False,
        ('compiled inference peak memory', 384, 32): True,
        ('compiled training speed ratio', 384, 8): True,
        ('compiled training peak memory', 384, 8): False,
    }


def test_markdown_table_one_line_per_row():
    row = dict(model='a', variant='posattn', baseline='b', img_size=224, tokens=197, mode='infer', batch_size=4,
               img_per_s=150.0, baseline_img_per_s=100.0, ratio=1.5, peak_mem_mb=90.0, baseline_peak_mem_mb=100.0,
               mem_ratio=0.9)
    table = throughput.markdown_table([
        row, dict(row, mode='train', peak_mem_mb=None, mem_ratio=None, flop_ratio=1.2, ratio_of_bound=1.25)])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2] == '| a | posattn | b | 224 | 197 | infer | 4 | 150.0 | 100.0 | 1.50 | - | - | 90 | 100 | 0.90 |'
    spread = throughput.markdown_table([dict(row, paired_ratios=[1.4, 1.7, 1.5])]).splitlines()[2]
    assert '| 1.50 (1.40-1.70) |' in spread
    assert lines[3].endswith('| 1.50 | 1.20 | 1.25 | - | 100 | - |')


def test_step_flops_of_timm_vit_match_the_formula():
    batch, dim, depth, classes, patch = 3, 192, 2, 10, 4
    tokens = (32 // patch) ** 2 + 1
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=patch, depth=depth, num_heads=12,
                              mlp_ratio=1.0, num_classes=classes)
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * dim) + 2 * 2 * tokens * tokens * dim
    forward = batch * (2 * (tokens - 1) * dim * 3 * patch * patch + depth * per_block + 2 * dim * classes)
    assert throughput.step_flops(model, 'infer', batch) == forward  # SDPA decomposed and counted, not skipped
    train = throughput.step_flops(model, 'train', batch)
    assert 2.5 * forward < train <= 3 * forward  # backward ~2x forward (no input gradient for the patch conv)
    assert next(model.parameters()).device.type == 'cpu'  # counted on a meta copy, the model is untouched


def test_positional_attention_needs_fewer_flops():
    model = timm.create_model(TINY, **TINY_KWARGS)
    baseline, _ = throughput.create_baseline(TINY, model, 'timm', TINY_KWARGS)
    for mode in ('infer', 'train'):
        assert throughput.step_flops(model, mode, 4) < throughput.step_flops(baseline, mode, 4)


def test_attention_layout_script_checks_variants_and_writes_rows(tmp_path):
    layout = _load_script('attention_layout')
    out = tmp_path / 'layout.json'
    rows = layout.main(['-b', '3', '--tokens', '5', '--dim', '8', '--heads', '2', '--warmup', '1', '--repeats', '2',
                        '--json', str(out)])
    names = list(layout.make_variants(2))
    assert [(r['variant'], r['mode']) for r in rows] == [(n, m) for m in ('infer', 'train') for n in names]
    for row in rows:
        assert row['ms'] > 0 and len(row['seconds_per_repeat']) == 2
        if row['variant'] == 'bmm':
            assert row['speed_vs_ours'] == 1.0
        if row['variant'] == 'timm_sdpa':
            assert row['speed_vs_timm'] == 1.0
    assert json.loads(out.read_text())['rows'] == rows
    rows = layout.time_layouts(batch_size=2, tokens=5, dim=8, num_heads=2, warmup=1, repeats=1, projections=True)
    assert [r['variant'] for r in rows] == ['model', 'channels_first', 'timm_attention'] * 2
    with pytest.raises(ValueError, match='divisible'):
        layout.time_layouts(dim=10, num_heads=3)


def test_attention_layout_variants_compute_the_same_mixing():
    """The alternatives the script times are the same function as the model's bmm (else the timing means nothing)."""
    layout = _load_script('attention_layout')
    variants = layout.make_variants(3)
    attn, v = torch.randn(3, 7, 7).softmax(-1), torch.randn(2, 7, 12)
    ref = torch.einsum('hnm,bmhd->bnhd', attn, v.view(2, 7, 3, 4)).reshape(2, 7, 12)
    for name in ('bmm', 'broadcast', 'einsum', 'sdpa_bias'):
        torch.testing.assert_close(variants[name](attn, v, None), ref, rtol=1e-5, atol=1e-5)


def test_device_check_script_dry_run_on_cpu(tmp_path):
    """The prepared GPU script's env and grads steps, run on the CPU (DEVICE=cpu stops before the GPU-only steps)."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(SCRIPT), 'device_check.sh')
    env = dict(os.environ, DEVICE='cpu', OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', script], cwd=os.path.dirname(os.path.dirname(SCRIPT)), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / 'summary.txt').read_text().split('\n')
    assert [line.split()[:2] for line in summary if line] == [['env', 'rc=0'], ['grads', 'rc=0'], ['sweep', 'rc=0']]
    assert 'grads OK' in (tmp_path / 'grads.log').read_text()


def test_attention_layout_channels_first_is_the_model_attention():
    """The copy-free variant computes what PositionalAttention computes, given the same weights."""
    from timm_posattn.layers import FixedAttentionMap, PositionalAttention
    layout = _load_script('attention_layout')
    module = PositionalAttention(8, num_heads=2, grid_size=(2, 2), qkv_bias=True)
    weights = {name: p.detach() for name, p in module.named_parameters() if name.startswith(('v.', 'proj.'))}
    weights.update({'qkv.weight': torch.randn(24, 8), 'qkv.bias': torch.randn(24)})
    variants = layout.make_projection_variants(2, weights)
    attn, x = torch.randn(2, 5, 5).softmax(-1), torch.randn(3, 5, 8)
    module.pos_map = FixedAttentionMap(attn, (2, 2))  # the module then mixes with exactly this attention
    with torch.no_grad():
        expected = module(x, x.new_zeros(1, 5, 8), (2, 2))
        for name in ('model', 'channels_first'):
            torch.testing.assert_close(variants[name](attn, x, None), expected, rtol=1e-5, atol=1e-5)


def test_onnx_throughput_script_exports_both_models_alike(tmp_path):
    """ours (reparameterized) and timm's ViT exported by the same function, each checked, then timed in turns."""
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    onnx_throughput = _load_script('onnx_throughput')
    out = tmp_path / 'onnx.json'
    payload = onnx_throughput.main(['--models', TINY, '--img-size', '32', '--batch-size', '2', '--threads', '1',
                                    '--repeats', '2', '--json', str(out)])
    (row,) = payload['rows']
    assert row['variant'] == 'reparam_onnx' and row['img_size'] == 32 and row['tokens'] == 65
    assert row['img_per_s'] > 0 and row['baseline_img_per_s'] > 0 and len(row['paired_ratios']) == 2
    assert row['baseline'].startswith('vit_tiny_patch16_224(img_size=32')
    assert all(diff <= 1e-4 for diff in row['onnx_max_abs_diff'])
    assert row['flop_ratio'] > 1  # the baked model computes no attention from the positional table
    assert json.loads(out.read_text())['environment']['onnxruntime']
    assert os.listdir(tmp_path) == ['onnx.json']  # the exported files lived in a temporary folder


def test_distill_step_times_both_tasks_and_refuses_bad_input(tmp_path, capsys):
    distill_step = _load_script('distill_step')
    out = tmp_path / 'distill.json'
    result = distill_step.main(['--student', 'vit_posattn_tiny_patch4_32', '--teacher', 'vit_tiny_patch16_224',
                                '-b', '2', '--warmup', '0', '--repeats', '1', '--json', str(out)])
    steps = [row['step'] for row in result['rows']]
    assert steps == ['student, ClassificationTask', 'student, LogitDistillationTask',
                     'teacher architecture, ClassificationTask']
    assert result['rows'][0]['ratio_to_plain_student'] == 1.0
    assert all(row['seconds_per_step'] > 0 for row in result['rows'])
    assert json.loads(out.read_text())['rows'] == result['rows']
    with pytest.raises(UsageError, match='already holds distill.json, which benchmarks/distill_step.py writes'):
        distill_step.main(['--json', str(out)])  # refused before any work
    with pytest.raises(UsageError, match='unknown model architecture'):
        distill_step.main(['--student', 'no_such_model'])
    with pytest.raises(SystemExit) as e:
        distill_step.main(['--repeats', '0'])
    assert e.value.code == 2 and 'out of range' in capsys.readouterr().err
