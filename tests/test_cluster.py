"""Scale-out on one CPU machine: run_with_submitit.py under submitit's LocalExecutor (2 tasks),
preempted and requeued, and a two-node torchrun on 127.0.0.1; each against the same pruning
run under torchrun with 2 processes on one node (gloo), which must come out bit for bit."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, check_ok, cli_command, cli_env, free_port, run_cli

submitit = pytest.importorskip('submitit')

# the distributed pruning run of test_prune_cli: 2 processes × batch 16 × accumulation 2
FLAGS = ['--input-size', '16', '--batch-size', '16', '--grad-accum-steps', '2',
         '--prune-method', 'block_pr', '--prune-steps-update-mask', '4', '--epochs', '2',
         '--prune-start-epoch', '0', '--prune-sparse-epoch', '1', '--prune-ratio', '0.5',
         '--dist-eval', '--device', 'cpu']
DIGEST = re.compile(r'\[rank (\d)\] parameter digest ([0-9a-f]{16})')


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def records(out, name):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def assert_same_run(out, ref):
    """The same cut model, the same pruning records and the same log.txt."""
    a, b = load(ref / 'first_sparse_checkpoint.pth'), load(out / 'first_sparse_checkpoint.pth')
    assert a['arch'] == b['arch'] and a['model'].keys() == b['model'].keys()
    unequal = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert not unequal, unequal[:5]
    assert records(out, 'pruning_log.jsonl') == records(ref, 'pruning_log.jsonl')
    assert records(out, 'log.txt') == records(ref, 'log.txt')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The run under torchrun, 2 processes on one node."""
    tmp = tmp_path_factory.mktemp('torchrun')
    out = tmp / 'out'
    proc = check_ok(run_cli([*FLAGS, '--output_dir', out], tmp,
                            launcher=[sys.executable, '-m', 'torch.distributed.run',
                                      '--nproc_per_node=2', f'--master_port={free_port()}']))
    digests = dict(DIGEST.findall(proc.stdout))
    assert set(digests) == {'0', '1'} and digests['0'] == digests['1']
    return out, digests['0']


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """The submitting process's environment, which the local executor's tasks inherit: that
    of every main.py run of the tests (one thread, TORCH_HOME here, not distributed)."""
    for k, v in cli_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
        monkeypatch.delenv(k, raising=False)


def submit(tmp_path, *extra):
    import run_with_submitit
    from conftest import BASE_ARGS
    argv = [*BASE_ARGS, *FLAGS, *extra, '--cluster', 'local', '--nodes', '1', '--ngpus', '2',
            '--timeout', '30', '--job_dir', str(tmp_path / 'jobs' / '%j')]
    return run_with_submitit.main([str(a) for a in argv])


def task_logs(job):
    return [job.task(i).stdout() or '' for i in range(2)]


def tasks_of(job):
    """The pids of the job's task processes (children of the local executor's controller)."""
    pids = []
    for stat in os.listdir('/proc'):
        if stat.isdigit():
            try:
                with open(f'/proc/{stat}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == job._process.pid:  # fields[1] is the parent pid
                pids.append(int(stat))
    return pids


def test_submitit_two_tasks_give_the_torchrun_run(reference, job_env, tmp_path):
    ref, digest = reference
    job = submit(tmp_path)
    job.wait()
    logs = task_logs(job)
    assert job.state == 'FINISHED', '\n'.join(log[-3000:] for log in logs) + (job.task(0).stderr() or '')[-3000:]
    job.results()  # raises if a task failed
    out = tmp_path / 'jobs' / job.job_id
    assert 'Process group: 2 tasks, rank 1' in logs[1]
    assert [dict(DIGEST.findall(log)) for log in logs] == [{'0': digest}, {'1': digest}]
    assert_same_run(out, ref)


def test_submitit_requeued_job_resumes_exactly(reference, job_env, tmp_path):
    """Preempted as SLURM does it (the preemption signal to every task, after the first epoch's
    checkpoint), the job is requeued by submitit with --resume and ends as if uninterrupted."""
    ref, digest = reference
    job = submit(tmp_path)
    out = tmp_path / 'jobs' / job.job_id
    ckpt, deadline = out / 'checkpoint.pth', time.time() + 600
    while not ckpt.exists() and time.time() < deadline and job._process.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), task_logs(job)
    pids = tasks_of(job)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, submitit.JobEnvironment._usr_sig())
    job.wait()
    logs = task_logs(job)
    assert job.state == 'FINISHED', '\n'.join(log[-3000:] for log in logs)
    job.results()
    # task 0 checkpointed and requeued, and the second start resumed from epoch 0's checkpoint
    assert 'Requeuing with --resume ' + str(ckpt) in logs[0]
    assert f'Resumed from {ckpt} at epoch 1' in logs[0]
    assert len(re.findall(r'Process group: 2 tasks, rank 0', logs[0])) == 2
    assert dict(DIGEST.findall(logs[0])) == {'0': digest}
    assert_same_run(out, ref)


def test_two_node_torchrun_on_one_machine(reference, tmp_path):
    """torchrun --nnodes 2: node ranks 0 and 1 on 127.0.0.1, one process each."""
    ref, digest = reference
    out, port = tmp_path / 'out', free_port()
    nodes = [subprocess.Popen(
        cli_command([*FLAGS, '--output_dir', out], launcher=[
            sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--node_rank', rank,
            '--nproc_per_node', '1', '--master_addr', '127.0.0.1', '--master_port', port]),
        cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in ('0', '1')]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], '\n'.join(log[-3000:] for log in logs)
    # each node prints its own rank's digest: both end with the same weights, the reference's
    assert [dict(DIGEST.findall(log)) for log in logs] == [{'0': digest}, {'1': digest}]
    assert_same_run(out, ref)
