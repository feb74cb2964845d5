"""train.py's knowledge distillation through timm.task (`--kd-model-name` and friends).

Tiny CPU runs on `structured`: a 1-block, width-24 standard-attention teacher trained by train.py, then students
distilled from it (or from a copy of it whose two logits are swapped, so that following the teacher and following the
labels give opposite answers). The argument errors run in-process like test_cli_policy.py's.
"""
import csv
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from cli_assertions import assert_one_line_error  # noqa: E402
from timm_posattn.dataset_info import STRUCTURED_MEAN, STRUCTURED_STD  # noqa: E402
from timm_posattn.loading import load_model, make_checkpoint, read_checkpoint  # noqa: E402
from timm_posattn.structured import StructuredImageDataset  # noqa: E402

TINY = ['-j', '0', '--log-interval', '100', '--no-attention-plot']
TEACHER_KWARGS = ['--model-kwargs', 'depth=1', 'embed_dim=24', 'num_heads=2', 'pos_attn_blocks=none']
STUDENT_KWARGS = ['--model-kwargs', 'depth=1', 'embed_dim=24', 'num_heads=2']
DATA = ['--train-num-samples', '384', '--val-num-samples', '128', '-b', '32', '--lr', '3e-3', '--warmup-epochs', '0',
        '--smoothing', '0']
SMALL_DATA = ['--train-num-samples', '64', '--val-num-samples', '32', '-b', '32']


def run_main(*argv):
    return train.main([str(a) for a in argv])


def read_summary(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def predictions(model, num_samples=128):
    """Top classes of a model on the validation split, normalized as its pretrained cfg says."""
    cfg = model.pretrained_cfg
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cfg['mean'], cfg['std'])])
    dataset = StructuredImageDataset(split='validation', num_samples=num_samples)
    images = torch.stack([to_input(dataset[i][0]) for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        return model.eval()(images).argmax(-1), labels


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A train.py checkpoint of a standard-attention ViT, its final top-1, and a copy with its two logits swapped."""
    out = tmp_path_factory.mktemp('teacher')
    result = run_main('--output', out, '--experiment', 'teacher', '--epochs', '2', *TEACHER_KWARGS, *DATA, *TINY)
    path = out / 'teacher' / 'last.pth.tar'
    ckpt = read_checkpoint(path)
    swapped = dict(ckpt.state_dict, **{k: ckpt.state_dict[k].flip(0) for k in ('head.weight', 'head.bias')})
    swapped_path = out / 'swapped.pth.tar'
    torch.save(make_checkpoint(arch=ckpt.arch, epoch=ckpt.epoch, state_dict=swapped, args=ckpt.args), swapped_path)
    return path, result['eval']['top1'], swapped_path


@pytest.fixture(scope='module')
def distilled(teacher, tmp_path_factory):
    """A student distilled from the swapped teacher only (--task-loss-weight 0), fed with another normalization than
    the teacher's (--mean/--std), so that DistillationTeacher must renormalize."""
    _, _, swapped = teacher
    out = tmp_path_factory.mktemp('student')
    result = run_main('--output', out, '--experiment', 'student', '--epochs', '4', '--kd-model-name', swapped,
                      '--task-loss-weight', '0', '--kd-temperature', '1', '--mean', '0.45', '--std', '0.2',
                      *STUDENT_KWARGS, *DATA, *TINY)
    return out / 'student', result


def test_checkpoint_model_reports_its_training_normalization(teacher):
    """A model rebuilt from a train.py checkpoint has the run's mean/std in its pretrained cfg (DistillationTeacher
    reads them from there), not its default tag's."""
    path, _, _ = teacher
    cfg = load_model(path).model.pretrained_cfg
    assert tuple(cfg['mean']) == STRUCTURED_MEAN and tuple(cfg['std']) == pytest.approx(STRUCTURED_STD)
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'nearest'


def test_teacher_top1_is_measured_on_the_students_inputs(teacher, distilled):
    """The teacher's top-1, logged once at the start, is its own top-1: the student's inputs (mean 0.45, std 0.2)
    reach it renormalized to its structured mean/std. The swapped teacher gets exactly the other answers."""
    _, teacher_top1, _ = teacher
    _, result = distilled
    assert result['teacher_eval']['top1'] == pytest.approx(100.0 - teacher_top1)


def test_summary_gains_a_finite_distillation_loss(distilled):
    run_dir, _ = distilled
    rows = read_summary(run_dir / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == [0, 1, 2, 3]
    for row in rows:
        kd, task, total = float(row['train_kd_loss']), float(row['train_task_loss']), float(row['train_loss'])
        assert math.isfinite(kd) and kd > 0 and math.isfinite(task)
        assert total == pytest.approx(kd)  # --task-loss-weight 0 alone: loss = 0 * task + 1 * kd
    assert float(rows[-1]['train_kd_loss']) < float(rows[0]['train_kd_loss'])


def test_distillation_makes_the_student_follow_the_teacher(teacher, distilled):
    """Trained only on the swapped teacher, the student agrees with it and so disagrees with the labels; an untrained
    student agrees with it at chance."""
    _, _, swapped = teacher
    run_dir, result = distilled
    teacher_pred, labels = predictions(load_model(swapped).model)
    student_pred, _ = predictions(load_model(run_dir / 'last.pth.tar').model)
    untrained_pred, _ = predictions(load_model('vit_posattn_tiny_patch4_32', depth=1, embed_dim=24, num_heads=2,
                                               global_pool='avg', num_classes=2).model)
    agreement = (student_pred == teacher_pred).float().mean().item()
    assert agreement > 0.8, agreement
    assert agreement > (untrained_pred == teacher_pred).float().mean().item() + 0.2
    assert (student_pred == labels).float().mean().item() < 0.3
    assert result['eval']['top1'] < 30.0  # what train.py measured agrees


def test_resume_must_keep_the_distillation_settings(distilled, capsys):
    run_dir, _ = distilled
    code = train.run(['--resume', str(run_dir / 'last.pth.tar'), '--epochs', '5', *STUDENT_KWARGS, *DATA, *TINY])
    assert_one_line_error(code, capsys.readouterr().err, "--kd-model-name", "there, None here",
                          'fork the run into a new folder')


def test_feature_distillation_saves_the_student_and_its_projection(teacher, tmp_path, monkeypatch):
    """Feature distillation trains a projection (student width 32 -> teacher width 24) next to the student: the
    checkpoint holds the student's weights (and EMA) under the student's keys, the projection as timm's task_state,
    and the student loads back on its own."""
    path, _, _ = teacher
    run_main('--output', tmp_path, '--experiment', 'feature', '--epochs', '1', '--kd-model-name', path,
             '--kd-distill-type', 'feature', '--model-ema', '--model-ema-decay', '0.9',
             '--model-kwargs', 'depth=1', 'embed_dim=32', 'num_heads=2', *SMALL_DATA, *TINY)
    ckpt = torch.load(tmp_path / 'feature' / 'last.pth.tar', map_location='cpu', weights_only=True)
    student = load_model(tmp_path / 'feature' / 'last.pth.tar').model
    assert set(ckpt['state_dict']) == set(ckpt['state_dict_ema']) == set(student.state_dict())
    assert ckpt['task_state']['projection']['weight'].shape == (24, 32)
    assert 'projection' in ckpt['task_state_ema']
    assert 'train_kd_loss' in read_summary(tmp_path / 'feature' / 'summary.csv')[0]
    # --resume restores the student, its EMA and the projection (timm's resume_task_checkpoint) and continues
    from timm.task import FeatureDistillationTask
    restored = []
    load_task_state = FeatureDistillationTask.load_task_state

    def spy(self, state, *args, **kwargs):
        restored.append((kwargs.get('ema', False), state))
        return load_task_state(self, state, *args, **kwargs)
    monkeypatch.setattr(FeatureDistillationTask, 'load_task_state', spy)
    run_main('--resume', tmp_path / 'feature' / 'last.pth.tar', '--epochs', '2', '--kd-model-name', path,
             '--kd-distill-type', 'feature', '--model-ema', '--model-ema-decay', '0.9',
             '--model-kwargs', 'depth=1', 'embed_dim=32', 'num_heads=2', *SMALL_DATA, *TINY)
    rows = read_summary(tmp_path / 'feature' / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == [0, 1] and all(math.isfinite(float(r['train_kd_loss'])) for r in rows)
    assert sorted(ema for ema, _ in restored) == [False, True]
    for ema, state in restored:
        saved = ckpt['task_state_ema' if ema else 'task_state']['projection']
        assert torch.equal(state['projection']['weight'], saved['weight'])


def test_imagenet_recipe_takes_the_converted_vit_small():
    """configs/imagenet_convert_small.yaml: its model has exactly the weights `timm_posattn.convert` writes for
    vit_small_patch16_224, its inputs are normalized as the source's (so DistillationTeacher passes them unchanged),
    and it distills from that source."""
    from timm_posattn.convert import twin_kwargs
    args = train.parse_args(['-c', str(REPO / 'configs' / 'imagenet_convert_small.yaml'), '--data-dir', 'imagenet'])
    train.resolve_defaults(args)
    train.check_args(args)
    assert args.kd_model_name == 'vit_small_patch16_224.augreg_in21k_ft_in1k' and args.kd_distill_type == 'logit'
    source_cfg = timm.get_pretrained_cfg(args.kd_model_name)
    assert tuple(args.mean) == source_cfg.mean and tuple(args.std) == source_cfg.std
    assert args.crop_pct == source_cfg.crop_pct and args.interpolation == source_cfg.interpolation
    def shapes(**kwargs):
        return {k: v.shape for k, v in timm.create_model(args.model, device='meta', **kwargs).state_dict().items()}
    converted = dict(twin_kwargs(timm.create_model(source_cfg.architecture, device='meta')),
                     pos_attn_layer=args.model_kwargs['pos_attn_layer'])  # what convert builds for this source
    assert shapes(**converted) == shapes(num_classes=args.num_classes, **args.model_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Errors: one line, exit code 2, before any training


def run_command(argv):
    """train.py's entry point in-process; argparse's errors exit from inside the parser."""
    try:
        return train.run([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize('argv, expected', [
    (['--kd-model-name', 'x.pth.tar', '--kd-temperature', '0'], 'expected > 0'),
    (['--kd-model-name', 'x.pth.tar', '--kd-temperature', '-2'], 'expected > 0'),
    (['--kd-model-name', 'x.pth.tar', '--distill-loss-weight', '-1'], 'expected >= 0'),
    (['--kd-model-name', 'x.pth.tar', '--task-loss-weight', '-0.5'], 'expected >= 0'),
    (['--kd-model-name', 'x.pth.tar', '--kd-distill-type', 'attention'], "invalid choice: 'attention'"),
    (['--kd-temperature', '2'], '--kd-temperature would have no effect: there is no teacher'),
    (['--kd-distill-type', 'logit', '--distill-loss-weight', '1'], '--kd-distill-type, --distill-loss-weight'),
    (['--kd-model-name', 'x.pth.tar', '--kd-distill-type', 'feature', '--kd-temperature', '2'],
     'feature distillation compares features'),
    (['--kd-model-name', 'x.pth.tar', '--kd-distill-type', 'token', '--kd-token-distill-type', 'hard',
      '--kd-temperature', '2'], 'hard token distillation'),
    (['--kd-model-name', 'x.pth.tar', '--kd-token-distill-type', 'soft'], 'applies to --kd-distill-type token'),
    (['--kd-model-name', 'x.pth.tar', '--task-loss-weight', '1.5'], '1 - 1.5 < 0'),
    (['--kd-model-name', 'x.pth.tar', '--task-loss-weight', '0', '--distill-loss-weight', '0'],
     'nothing would be trained'),
    # the teacher is resolved before the data and the student: a source that cannot give one stops there
    (['--kd-model-name', 'missing.pth.tar'], "checkpoint 'missing.pth.tar' not found"),
    (['--kd-model-name', 'no_such_model'], "unknown model architecture 'no_such_model' (from --kd-model-name)"),
    (['--kd-model-name', 'vit_posattn_tiny_patch4_32'], 'a teacher needs trained weights'),
    (['--kd-model-name', 'local-dir:missing_folder'], 'config.json not found'),
])
def test_distillation_arguments_are_checked_before_building(argv, expected, tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run_command([*argv, '--output', tmp_path, *SMALL_DATA, *TINY])
    assert_one_line_error(code, capsys.readouterr().err, expected)


def _untrained_checkpoint(path, **model_kwargs):
    model = load_model('vit_posattn_tiny_patch4_32', depth=1, embed_dim=24, num_heads=2, **model_kwargs).model
    torch.save(make_checkpoint(arch='vit_posattn_tiny_patch4_32', epoch=0, state_dict=model.state_dict(),
                               args={'model_kwargs': dict(depth=1, embed_dim=24, num_heads=2, **model_kwargs)}), path)
    return path


@pytest.mark.parametrize('model_kwargs, extra, expected', [
    (dict(num_classes=3), [], 'predicts 3 classes, the student 2'),
    (dict(num_classes=2, img_size=16), [], "does not take the student's 3x32x32 inputs"),
    (dict(num_classes=2), ['--kd-distill-type', 'token'], '--kd-distill-type token does not apply'),
])
def test_teacher_that_does_not_fit_the_student_is_refused(model_kwargs, extra, expected, tmp_path, capsys):
    teacher = _untrained_checkpoint(tmp_path / 'teacher.pth.tar', **model_kwargs)
    code = train.run(['--kd-model-name', str(teacher), *extra, '--output', str(tmp_path), '--experiment', 'exp',
                      *STUDENT_KWARGS, *SMALL_DATA, *TINY])
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert not (tmp_path / 'exp').exists()  # refused before anything was written
