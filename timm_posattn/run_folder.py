"""The train.py run folder: where a run writes, which run a checkpoint belongs to, and how a run is continued.

A run folder is claimed (`outputs.FolderClaim`) for the run's lifetime, and its manifest lists every file the run
wrote and carries the run's id. Every checkpoint carries the same id, so a checkpoint says which run it belongs to
wherever it is found:

* ``--resume CKPT`` continues in place only when CKPT's run id is the id of the run its folder holds; a checkpoint of
  another run (linked or copied there), or one written before run ids existed, is refused with the way to fork it.
* ``--resume CKPT --experiment NEW`` forks the run into a new folder: a new run id, its origin recorded.
* ``--overwrite`` starts a new run in a folder that holds an earlier one, removing exactly the files the earlier
  run's manifest lists.
* Continuing a run abandons what it wrote after the resumed epoch: those checkpoints (listed in its manifest) are
  removed and model_best is made the best of the continued run (`discard_abandoned_run`, `reconcile_best`).
"""
import argparse
import logging
import os
import re
from datetime import datetime
from typing import Any, Optional, Sequence, Union

import torch.nn as nn
from timm import utils
from timm.models import resume_checkpoint, safe_model_name, split_model_name_tag
from timm.task import TrainingTask, resume_task_checkpoint

from .cli import UsageError, one_line
from .files import atomic_write
from .loading import (
    LoadError, TrainCheckpoint, checkpoint_model_kwargs, make_checkpoint, plain_args, read_checkpoint, same_kwarg_value,
    write_checkpoint,
)
from .outputs import FolderClaim, OutputError, OutputFolder, read_manifest
from .published import check_finite

__all__ = [
    'OWNED_FILES', 'DEFAULT_OUTPUT', 'RunFolder', 'AtomicCheckpointSaver', 'Progress', 'resolve_run_folder',
    'read_resume_checkpoint', 'check_resume_ranking', 'check_resume_options', 'check_resume_model',
    'restore_training_state', 'discard_abandoned_run', 'reconcile_best', 'saved_epoch',
]

_logger = logging.getLogger('train')

DEFAULT_OUTPUT = './output/train'
KEY = 'train'
# The names a run writes into its folder: files of these names that are not the run's own are refused without
# --overwrite; nothing is ever deleted by these names (only what a run's manifest lists).
OWNED_FILES = ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-*.pth.tar',
               'attention.png', 'tmp.pth.tar', 'recovery-*.pth.tar', 'recovery_tmp.pth.tar')
_CHECKPOINT_NAME = re.compile(r'checkpoint-(\d+)\.pth\.tar')


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def saved_epoch(path: str) -> Optional[int]:
    """The epoch a checkpoint file holds (its tensors memory-mapped, not read); None if it is not readable."""
    try:
        return read_checkpoint(path, mmap=True).epoch
    except LoadError:
        return None


class RunFolder:
    """Where a run writes: the folder, whether it continues the run there, and (once claimed) the claim."""

    def __init__(self, folder: OutputFolder, resume: Optional[TrainCheckpoint] = None) -> None:
        self.folder = folder
        self.path = str(folder.path)
        self.resume = resume
        self.continuing = resume is not None and _same_path(self.path, os.path.dirname(os.path.abspath(resume.path)))
        self.claim: Optional[FolderClaim] = None

    def file(self, name: str) -> str:
        return self.folder.file(name)

    @property
    def run_id(self) -> Optional[str]:
        return self.claim.run_id if self.claim is not None else None

    def acquire(self) -> FolderClaim:
        """Claim the folder (rank 0 only): continue the run it holds, fork into it, or start a new run there."""
        folder, resume = self.folder, self.resume
        if self.continuing:
            if not resume.run_id:
                raise UsageError(
                    f"--resume '{resume.path}' has no run id (written before timm_posattn 0.3 or not by train.py), "
                    f"so nothing says it belongs to the run in '{self.path}': fork it into a new folder with "
                    f"--experiment NAME (weights, optimizer and schedule carry over)")
            if read_manifest(folder.path, KEY) is None:
                raise UsageError(f"--resume '{resume.path}': '{self.path}' keeps no record of a train.py run to "
                                 f"continue; fork it into a new folder with --experiment NAME")
            claim = folder.claim(resume=True).acquire()
            if claim.run_id != resume.run_id:
                claim.release()
                raise UsageError(
                    f"--resume '{resume.path}' belongs to run {resume.run_id[:8]}, but '{self.path}' holds run "
                    f"{claim.run_id[:8]} (the checkpoint was linked or copied there): continuing would overwrite "
                    f"that run; fork it into a new folder with --experiment NAME")
            self.claim = claim
            return claim
        self.claim = folder.claim().acquire()
        return self.claim

    def begin(self) -> None:
        """Make the claimed folder this run's, once everything is built: an earlier run's files (listed in its
        manifest, with --overwrite) are removed only now, and a fork records where it came from."""
        if self.continuing:
            return
        removed = self.claim.remove_previous()  # only with --overwrite (the claim refused the earlier run's files)
        if removed:
            _logger.info(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.path}")
        resume = self.resume
        self.claim.update(forked_from=None if resume is None else {
            'run_id': resume.run_id, 'checkpoint': os.path.abspath(resume.path), 'epoch': resume.epoch})

    def check(self) -> None:
        """What every rank checks before anything is built: the folder can be written, and holds no other run."""
        if self.continuing:
            self.folder.check_writable()
            return
        self.folder.check()

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None


def resolve_run_folder(args: argparse.Namespace, resume: Optional[TrainCheckpoint] = None) -> RunFolder:
    """The experiment folder, checked before anything is built (a refused run costs nothing).

    A new run needs a folder without a previous run's files (or --overwrite). A resumed run continues in its
    checkpoint's folder; --output/--experiment naming another folder forks it there, which must be new or empty.
    """
    if resume is not None:
        run_dir = os.path.dirname(os.path.abspath(resume.path))
        path = os.path.join(args.output or os.path.dirname(run_dir), args.experiment or os.path.basename(run_dir))
    else:
        size = args.input_size[-1] if args.input_size else args.img_size
        name = args.experiment or '-'.join(
            [datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model)] + ([str(size)] if size else []))
        path = os.path.join(args.output or DEFAULT_OUTPUT, name)
    run = RunFolder(OutputFolder(path, OWNED_FILES, overwrite=args.overwrite, command='train.py', key=KEY), resume)
    if run.continuing and args.overwrite:
        raise UsageError(f"--overwrite would remove the run that --resume continues in '{path}'; leave it out")
    if resume is not None and not run.continuing and os.path.isdir(path) and os.listdir(path) and not args.overwrite:
        raise UsageError(
            f"--resume continues the run in '{run_dir}', but --output/--experiment name '{path}', which already "
            f"holds files: leave them out to continue in place, or name a new (empty) folder to fork the run there")
    run.check()
    return run


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's CheckpointSaver writing the `timm_posattn.loading` checkpoint format, crash-safe, into a claimed run
    folder.

    timm writes ``last`` via a temp file but unlinks the target first, and falls back to a plain copy for ``best``;
    here every file is complete before ``os.replace`` puts it in place, every file is listed in the run's manifest
    before it is written, and every checkpoint carries the run id and finite weights only.
    """

    def __init__(self, *args: Any, claim: Optional[FolderClaim] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claim = claim

    def _record(self, path: str) -> None:
        if self.claim is not None:
            self.claim.record(os.path.basename(path))

    def _forget(self, path: str) -> None:
        if self.claim is not None and not os.path.exists(path):
            self.claim.forget(os.path.basename(path))

    def _save(self, save_path, epoch, metric=None):
        extra = {'optimizer': self.optimizer.state_dict(), 'saver': self.state_dict(epoch, metric)}
        if self.amp_scaler is not None:
            extra[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.task is not None:  # the task knows which module is the model (and keeps e.g. a feature projection)
            weights = {**self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn),
                       **self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn)}
        else:
            weights = {'state_dict': utils.get_state_dict(self.model, self.unwrap_fn)}
            if self.model_ema is not None:
                weights['state_dict_ema'] = utils.get_state_dict(self.model_ema, self.unwrap_fn)
        for key in ('state_dict', 'state_dict_ema'):
            if weights.get(key) is not None:
                check_finite(weights[key], f'the {"EMA " if key.endswith("ema") else ""}weights of epoch {epoch}')
        checkpoint = make_checkpoint(
            arch=self.args.model if self.args is not None else type(self.model).__name__.lower(),
            epoch=epoch,
            state_dict=weights.pop('state_dict'),
            args=self.args,
            state_dict_ema=weights.pop('state_dict_ema', None),
            metric=metric,
            run_id=self.claim.run_id if self.claim is not None else None,
            **weights,  # the task's own state (task_state, task_state_ema), as timm's saver stores it
            **extra,
        )
        self._record(save_path)
        try:
            atomic_write(save_path, lambda f: write_checkpoint(checkpoint, f), owner=KEY)
        except OSError as e:
            raise OutputError(f"could not write '{save_path}': {e.strerror or e}") from None

    def _replace(self, src, dst):
        self._record(dst)
        os.replace(src, dst)  # atomic on POSIX and Windows; never leaves dst missing
        self._forget(src)

    def _duplicate(self, src, dst):
        self._record(dst)
        if not _link_into(src, dst):  # no hard links here: a copy, written atomically
            atomic_write(dst, lambda f: _copy_file(src, f), owner=KEY)

    def _cleanup_checkpoints(self, trim=0):
        before = [path for path, _ in self.checkpoint_files]
        super()._cleanup_checkpoints(trim)
        for path in before:
            self._forget(path)

    def restore_best(self, source: str) -> None:
        """Put ``source`` (the checkpoint of ``best_epoch``) in place as model_best."""
        self._duplicate(source, os.path.join(self.checkpoint_dir, 'model_best' + self.extension))


def _copy_file(src: str, f) -> None:
    import shutil
    with open(src, 'rb') as source:
        shutil.copyfileobj(source, f, length=1 << 20)


def _link_into(src: str, dst: str) -> bool:
    """Hard-link ``src`` to ``dst`` through a temp name and rename it into place; False where links do not work."""
    from .files import temp_prefix
    tmp = os.path.join(os.path.dirname(dst), f'{temp_prefix(KEY)}{os.getpid()}_{os.path.basename(dst)}')
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(src, tmp)
    except (OSError, NotImplementedError):
        return False
    os.replace(tmp, dst)
    return True


def read_resume_checkpoint(args: argparse.Namespace) -> TrainCheckpoint:
    """Read --resume and check that this run can continue it: a training checkpoint of the same model and
    optimizer, with finite weights and epochs left to train."""
    ckpt = read_checkpoint(args.resume, mmap=True)
    if ckpt.epoch is None or not ckpt.args:
        raise LoadError(f"--resume '{ckpt.path}' is not a training checkpoint (no epoch or arguments): to start a "
                        f"new run from its weights use --initial-checkpoint")
    if ckpt.arch is not None and split_model_name_tag(ckpt.arch)[0] != split_model_name_tag(args.model)[0]:
        raise LoadError(f"--resume '{ckpt.path}' is a checkpoint of {ckpt.arch}, but this run trains {args.model} "
                        f"(--model); resume with --model {ckpt.arch}, or start from its weights with "
                        f"--initial-checkpoint")
    recorded_opt = ckpt.args.get('opt')
    if recorded_opt and not args.no_resume_opt and recorded_opt.lower() != args.opt.lower():
        raise LoadError(f"--resume '{ckpt.path}' was trained with --opt {recorded_opt}, this run uses --opt "
                        f"{args.opt}: give --opt {recorded_opt}, or --no-resume-opt for a fresh optimizer state")
    start_epoch = args.start_epoch if args.start_epoch is not None else ckpt.epoch + 1
    if args.epochs <= start_epoch:
        raise UsageError(f"--resume '{ckpt.path}' completed epoch {ckpt.epoch}: --epochs {args.epochs} leaves "
                         f"nothing to train (epochs are counted from 0); raise --epochs")
    check_finite(ckpt.state_dict, f"--resume '{ckpt.path}' (state_dict)")
    if ckpt.has_ema:
        check_finite(ckpt.state_dict_ema, f"--resume '{ckpt.path}' (state_dict_ema)")
    return ckpt


def check_resume_ranking(ckpt: TrainCheckpoint, args: argparse.Namespace) -> None:
    """Continuing a run keeps its best checkpoint: the new epochs must be ranked by the same metric."""
    recorded = ckpt.args.get('eval_metric')
    if recorded and recorded != args.eval_metric:
        raise UsageError(f"--resume '{ckpt.path}': the run ranked its checkpoints by {recorded}, this run by "
                         f"--eval-metric {args.eval_metric}; give --eval-metric {recorded}, or fork the run into a new "
                         f"folder (--experiment NAME) to rank afresh")


def check_resume_options(ckpt: TrainCheckpoint, args: argparse.Namespace, options: Sequence[str],
                         what: str = 'distillation settings') -> None:
    """Continuing a run keeps its objective (and summary.csv's columns): ``options`` must be as the run had them
    (a file given by another path is the same when it is the same file)."""
    def same(recorded: Any, current: Any) -> bool:
        if isinstance(recorded, str) and isinstance(current, str) and os.path.isfile(recorded) \
                and os.path.isfile(current):
            return _same_path(recorded, current)
        return recorded == current
    differ = [f'--{key.replace("_", "-")} {ckpt.args.get(key)!r} there, {getattr(args, key)!r} here'
              for key in options if not same(ckpt.args.get(key), getattr(args, key))]
    if differ:
        raise UsageError(f"--resume '{ckpt.path}': the run was trained with other {what} "
                         f"({'; '.join(differ)}): repeat them to continue it, or fork the run into a new folder "
                         f"(--experiment NAME)")


def check_resume_model(ckpt: TrainCheckpoint, args: argparse.Namespace) -> None:
    """The resumed weights must belong to the model this run builds (classes, size, model kwargs)."""
    recorded = checkpoint_model_kwargs(ckpt.args)  # as the run gave them: the weights' own fit is checked on loading
    current = checkpoint_model_kwargs(plain_args(args))
    differ = [f'{k}={recorded.get(k)!r} there, {current.get(k)!r} here' for k in sorted(set(recorded) | set(current))
              if not same_kwarg_value(recorded.get(k), current.get(k))]
    if differ:
        raise LoadError(f"--resume '{ckpt.path}' was trained with other model arguments ({'; '.join(differ)}): "
                        f"repeat the run's --model-kwargs/--num-classes/--img-size/--gp to continue it")


def restore_training_state(ckpt: TrainCheckpoint, model: Union[nn.Module, TrainingTask], optimizer=None,
                           loss_scaler=None, log_info: bool = True) -> int:
    """Model (or a timm task's model and task state), optimizer and AMP scaler state with timm's
    `resume_task_checkpoint` / `resume_checkpoint` (weights_only=True); returns the epoch to start at."""
    resume = resume_task_checkpoint if isinstance(model, TrainingTask) else resume_checkpoint
    try:
        epoch = resume(model, ckpt.path, optimizer=optimizer, loss_scaler=loss_scaler, log_info=log_info)
    except (RuntimeError, ValueError, KeyError) as e:
        detail = one_line(e)[:300]
        raise LoadError(f"--resume '{ckpt.path}' does not fit this run's model or optimizer ({detail}); "
                        f"--no-resume-opt starts a fresh optimizer state") from None
    return epoch if epoch is not None else ckpt.epoch + 1


def discard_abandoned_run(run: RunFolder, start_epoch: int, keep: str) -> None:
    """Resuming at ``start_epoch`` abandons whatever the run wrote after that: remove those checkpoints (listed in
    its manifest; never ``keep``, the one resumed from), so that none of them can later be taken for part of this
    run."""
    claim = run.claim
    later = [name for name in claim.files if _CHECKPOINT_NAME.fullmatch(name)
             and int(_CHECKPOINT_NAME.fullmatch(name).group(1)) >= start_epoch]
    last = run.file('last.pth.tar')
    if 'last.pth.tar' in claim.files and os.path.isfile(last) and (saved_epoch(last) or 0) >= start_epoch:
        later.append('last.pth.tar')
    removed = claim.remove([name for name in later if not _same_path(claim.path_of(name), keep)])
    if removed:
        _logger.info(f'Resuming at epoch {start_epoch}: removed the abandoned later checkpoints {", ".join(removed)}')


def reconcile_best(run: RunFolder, saver: AtomicCheckpointSaver, resume: TrainCheckpoint) -> None:
    """Make model_best.pth.tar the checkpoint of the saver's best epoch, so that the best of an abandoned run is never
    reported as this run's."""
    claim = run.claim
    best_file = run.file('model_best.pth.tar')
    on_disk = saved_epoch(best_file) if os.path.isfile(best_file) else None
    if saver.best_epoch is not None and on_disk == saver.best_epoch:
        return
    if 'model_best.pth.tar' in claim.files and claim.remove(['model_best.pth.tar']):
        _logger.info(f'Removed model_best.pth.tar (epoch {on_disk}): the resumed run\'s best is epoch '
                     f'{saver.best_epoch}')
    if saver.best_epoch is None:
        return
    for source in (run.file(f'checkpoint-{saver.best_epoch}.pth.tar'), resume.path):
        if os.path.isfile(source) and saved_epoch(source) == saver.best_epoch:
            saver.restore_best(source)
            _logger.info(f'model_best.pth.tar restored from {source} (epoch {saver.best_epoch})')
            return
    _logger.info(f'No checkpoint of the best epoch ({saver.best_epoch}) is left: the best is tracked afresh')
    saver.best_epoch = saver.best_metric = None


class Progress:
    """What a run has saved, for the message after Ctrl-C."""

    def __init__(self) -> None:
        self.output_dir: Optional[str] = None
        self.saved_epoch: Optional[int] = None  # the epoch last.pth.tar holds
        self.resumed_from: Optional[str] = None

    def describe(self) -> str:
        if self.saved_epoch is not None:
            last = os.path.join(self.output_dir, 'last.pth.tar')
            return f'{last} holds epoch {self.saved_epoch}; continue with --resume {last}'
        if self.resumed_from:
            return f'nothing saved yet: no epoch completed since resuming; {self.resumed_from} is unchanged'
        return 'nothing saved yet: no epoch completed'
