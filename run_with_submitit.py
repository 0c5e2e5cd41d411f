"""main.py on a SLURM cluster through submitit, as DeiT's run_with_submitit.py does.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2800 \\
        --job_dir /shared/runs/%j  [every main.py flag: --model ... --prune-method block_pr ...]

One task per GPU. Every task runs main.main() with RANK / WORLD_SIZE / LOCAL_RANK from
submitit's job environment and meets the others through a rendezvous file next to the job
folder (dist_url file://..., as DeiT does), so nothing has to be set by hand. The run writes
into --job_dir (%j is the job id) unless --output_dir names another folder; both must be on a
filesystem every node sees. When SLURM preempts the job or its time is about to run out, it
signals the job; submitit then calls SlurmJob.checkpoint, which requeues the same command with
--resume OUTPUT_DIR/checkpoint.pth: the run goes on from its last finished epoch, pruning state
included (main.py refuses a resume with other processes, batch size or accumulation).

`--cluster local` runs the same job on this machine (submitit's LocalExecutor, one node), which
is how the tests run it on the CPU: `--device cpu --ngpus N` starts N CPU tasks (gloo).
"""
import copy
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import submitit

import main as classification
from train.flags import ArgumentParser
from train.run_dir import check_run_dir
from train.check_args import check_args
from errors import UsageError

REPO = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    parser = ArgumentParser('Submitit for DeiT / Depth Aware Pruning',
                            parents=[classification.get_args_parser()])
    # the submitting machine often has no GPU, where main.py's default would be the CPU
    parser.set_defaults(device='cuda')
    parser.add_argument('--ngpus', default=8, type=int,
                        help='GPUs per node, one task each (with --device cpu: CPU tasks per node)')
    parser.add_argument('--nodes', default=2, type=int, help='nodes to request')
    parser.add_argument('--timeout', default=2800, type=int,
                        help='minutes of each job; a requeued job gets as many again')
    parser.add_argument('--job_dir', default='output/submitit/%j', type=str,
                        help='submitit\'s folder and, unless --output_dir is given, the run\'s; '
                             '%%j is the job id; on a filesystem every node sees')
    parser.add_argument('--partition', default='', type=str, help='SLURM partition (default: the cluster\'s)')
    parser.add_argument('--cluster', default=None, choices=['slurm', 'local'],
                        help='submitit executor (default: slurm where sbatch exists, else local)')
    return parser


def init_file_uri(job_dir) -> str:
    """A new rendezvous file for torch.distributed (file://): beside the job folders, since the
    job id (%j) is not known when the job is submitted; it must not exist yet."""
    folder = Path(job_dir)
    while '%j' in str(folder):
        folder = folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    return (folder.resolve() / f'{uuid.uuid4().hex}_init').as_uri()


class SlurmJob:
    """The job: main.main(args) in every task; `checkpoint` is submitit's requeue hook."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        self._setup_distributed()
        return classification.main(self.args)

    def checkpoint(self):
        """Called by submitit in task 0 when the job is preempted or times out: the same
        command again, resuming from the run's checkpoint.pth, with a new rendezvous file."""
        args = copy.copy(self.args)
        args.dist_url = init_file_uri(args.job_dir)
        checkpoint = Path(args.output_dir) / 'checkpoint.pth'
        if checkpoint.exists():
            args.resume, args.overwrite = str(checkpoint), False
        else:  # no epoch finished: what the interrupted attempt wrote is replaced
            args.overwrite = True
        print(f'Requeuing with --resume {args.resume or "(none)"}', flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(args))

    def _setup_distributed(self):
        """The job's folder and, with several tasks, the torchrun variables that main.py's
        utils.init_distributed_mode reads (SLURM sets SLURM_PROCID too, the local executor not)."""
        job_env = submitit.JobEnvironment()
        self.args.job_dir = str(self.args.job_dir).replace('%j', str(job_env.job_id))
        self.args.output_dir = str(self.args.output_dir).replace('%j', str(job_env.job_id))
        if job_env.num_tasks > 1:
            os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                              LOCAL_RANK=str(job_env.local_rank))
        print(f'Process group: {job_env.num_tasks} tasks, rank {job_env.global_rank}', flush=True)


@contextmanager
def repo_on_pythonpath():
    """Jobs import main.py (and this file) wherever they start: the submitted environment
    (the local executor's tasks, sbatch's default --export=ALL) carries the repository."""
    old = os.environ.get('PYTHONPATH')
    os.environ['PYTHONPATH'] = os.pathsep.join([REPO] + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            del os.environ['PYTHONPATH']
        else:
            os.environ['PYTHONPATH'] = old


def submit(args):
    """Check the command line here, then submit it; returns the submitit job."""
    args = copy.copy(args)
    if args.nodes < 1 or args.ngpus < 1 or args.timeout < 1:
        raise UsageError('--nodes, --ngpus and --timeout must be at least 1')
    args.job_dir = str(Path(args.job_dir).absolute())
    args.output_dir = str(Path(args.output_dir).absolute()) if args.output_dir else args.job_dir
    # the job checks again where it runs; here, so that a bad flag fails before the queue, the
    # same checks on the CPU (this machine may have no GPU)
    checked = check_args(argparse_copy(args, device='cpu'))
    if '%j' not in checked.output_dir:
        check_run_dir(checked)
    if args.cluster == 'slurm' and shutil.which('srun') is None:
        raise UsageError('--cluster slurm: this machine has no SLURM (no srun on PATH): submit from a '
                         'login node, or run here with --cluster local')
    try:
        executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=30)
    except RuntimeError as e:  # submitit found no cluster it knows
        raise UsageError(f'--cluster {args.cluster or "auto"}: {e}') from None
    if executor.cluster == 'local' and args.nodes != 1:
        raise UsageError(f'--cluster local runs on this machine only: --nodes 1, not {args.nodes}')
    on_cpu = args.device == 'cpu'
    executor.update_parameters(
        mem_gb=40 * args.ngpus, gpus_per_node=0 if on_cpu else args.ngpus,
        tasks_per_node=args.ngpus,  # one task per GPU
        cpus_per_task=10, nodes=args.nodes, timeout_min=args.timeout, name='dap',
        slurm_signal_delay_s=120, **({'slurm_partition': args.partition} if args.partition else {}))
    args.dist_url = init_file_uri(args.job_dir)
    with repo_on_pythonpath():
        job = executor.submit(SlurmJob(args))
    return job


def argparse_copy(args, **changes):
    args = copy.copy(args)
    for k, v in changes.items():
        setattr(args, k, v)
    return args


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        job = submit(args)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    print('Submitted job_id:', job.job_id)
    return job


if __name__ == '__main__':
    main()
