"""
train.py end to end, run as a subprocess (it is a script) on microscopic models and a synthetic data folder
written here, so nothing depends on prepare.py. Every run stays within a few seconds on two CPU cores, except
the single torch.compile run.
"""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from checkpoint import load_model
from helpers import ENV, ROOT, load_ckpt, max_diff, read_log, train
from model import GPT, GPTConfig

TINY = ['--device=cpu', '--dtype=float32', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--multiple_of=16', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=2',
        '--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=2', '--eval_iters=4', '--log_interval=1']
MICRO = TINY + ['--n_layer=1', '--n_embd=16', '--block_size=16', '--batch_size=2']  # later flags win
VOCAB = 64


def write_data(path, seed=0):
    """prepare.py's layout: meta.json, two train shards of unequal length, val.bin, test.bin, tokenizer.json.
    Documents are runs of consecutive token ids (a learnable pattern) closed by EOS."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    eos = VOCAB - 1

    def docs(n):
        tokens = []
        for _ in range(n):
            start, length = rng.integers(0, eos), rng.integers(20, 80)
            tokens += [(start + i) % eos for i in range(length)] + [eos]
        return np.array(tokens, dtype=np.uint16)

    parts = {'train_0000.bin': docs(100), 'train_0001.bin': docs(200), 'val.bin': docs(100), 'test.bin': docs(50)}
    for name, tokens in parts.items():
        tokens.tofile(os.path.join(path, name))
    with open(os.path.join(path, 'tokenizer.json'), 'w') as f:
        json.dump({'model': {'type': 'BPE'}}, f)

    def split(names):
        tokens = sum(len(parts[n]) for n in names)
        return {'docs': sum(int((parts[n] == eos).sum()) for n in names), 'tokens': tokens,
                'bytes': 3 * tokens, 'files': names}

    meta = {'tokenizer': 'bpe', 'vocab_size': VOCAB, 'dtype': 'uint16', 'eos_id': eos, 'bos_id': None,
            'pad_id': None, 'unk_id': None, 'tokenizer_file': 'tokenizer.json',
            'splits': {'train': split(['train_0000.bin', 'train_0001.bin']), 'val': split(['val.bin']),
                       'test': split(['test.bin'])}, 'inputs': ['synthetic'], 'dropped': {}}
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return path


def sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp('data')))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('trained'))
    train(out_dir, data_dir, *TINY, '--max_iters=30', '--lr_decay_iters=30', '--eval_interval=10')
    return out_dir


def test_tiny_run_loss_falls_and_logs_every_step(trained, data_dir):
    steps, evals = read_log(trained)
    assert [s['iter'] for s in steps] == list(range(30))
    assert all(set(s) == {'iter', 'loss', 'lr', 'tokens_per_s', 'mfu', 'elapsed_s'} for s in steps)
    assert [e['iter'] for e in evals] == [0, 10, 20, 30]
    print(f"val loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}")
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0  # from ~ln(64) = 4.16
    assert np.mean([s['loss'] for s in steps[-5:]]) < np.mean([s['loss'] for s in steps[:5]]) - 1.0
    with open(os.path.join(data_dir, 'meta.json')) as f:
        val = json.load(f)['splits']['val']
    last = evals[-1]
    assert math.isclose(last['val_ppl'], math.exp(last['val_loss']))
    assert math.isclose(last['val_bpb'], last['val_loss'] / math.log(2) * val['tokens'] / val['bytes'])


def test_checkpoint_holds_the_shared_interface_and_loads_weights_only(trained):
    ckpt = load_ckpt(trained)  # weights_only=True: only plain types inside
    assert {'model', 'optimizer', 'model_args', 'config', 'iter_num', 'best_val_loss', 'rng', 'history',
            'data_dir', 'meta'} <= set(ckpt)
    assert ckpt['iter_num'] == 30 and ckpt['meta']['vocab_size'] == VOCAB
    assert ckpt['model_args']['vocab_size'] == VOCAB  # vocab_size=None took the data's
    assert ckpt['config']['max_iters'] == 30 and ckpt['config']['gradient_accumulation_steps'] == 2
    assert len(ckpt['history']['train_loss']) == 30 and len(ckpt['history']['eval']) == 4
    assert len(ckpt['rng']['data']) == 2 and all(isinstance(s, torch.Tensor) for s in ckpt['rng']['data'])
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])  # strict: the unwrapped, uncompiled names
    assert not os.path.exists(os.path.join(trained, 'ckpt.pt.tmp'))


def test_export_folder_is_self_contained_and_round_trips_the_logits(trained, data_dir):
    export = os.path.join(trained, 'export')
    assert sorted(os.listdir(export)) == ['README.md', 'config.json', 'loss_curves.png', 'meta.json',
                                          'model.safetensors', 'optimizer.pt', 'tokenizer.json', 'training_config.json']
    ckpt = load_ckpt(trained)
    with open(os.path.join(export, 'config.json')) as f:
        assert json.load(f) == ckpt['model_args']
    with open(os.path.join(export, 'training_config.json')) as f:
        training = json.load(f)
    assert training['config']['learning_rate'] == 1e-2
    assert training['history']['train_loss'] == ckpt['history']['train_loss']
    with open(os.path.join(export, 'meta.json')) as f:
        assert json.load(f) == ckpt['meta']
    assert sha(os.path.join(export, 'tokenizer.json')) == sha(os.path.join(data_dir, 'tokenizer.json'))
    optimizer = torch.load(os.path.join(export, 'optimizer.pt'), weights_only=True)
    assert len(optimizer['state']) == len(list(GPT(GPTConfig(**ckpt['model_args'])).parameters()))
    with open(os.path.join(export, 'loss_curves.png'), 'rb') as f:
        png = f.read()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 20_000
    exported, saved = load_model(export), load_model(trained)  # from model.safetensors / from ckpt.pt
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exported.hidden(idx) @ exported.output.weight.t(), saved.hidden(idx) @ saved.output.weight.t()
    print(f'max |logits difference| {(a - b).abs().max().item():.3g}')
    assert torch.equal(a, b)


def test_export_only_rebuilds_the_export_from_the_checkpoint(trained, data_dir, tmp_path):
    out_dir = str(tmp_path / 'copy')
    shutil.copytree(trained, out_dir)
    before = sha(os.path.join(out_dir, 'export', 'model.safetensors'))
    shutil.rmtree(os.path.join(out_dir, 'export'))
    train(out_dir, data_dir, '--export_only=True')
    assert sha(os.path.join(out_dir, 'export', 'model.safetensors')) == before
    assert os.path.exists(os.path.join(out_dir, 'export', 'loss_curves.png'))
    assert not os.path.exists(os.path.join(out_dir, 'export.tmp'))


def test_init_from_an_export_continues_with_its_weights_and_a_fresh_optimizer(trained, data_dir, tmp_path):
    out_dir = str(tmp_path / 'continued')
    train(out_dir, data_dir, *TINY, f'--init_from={os.path.join(trained, "export")}', '--max_iters=2',
          '--lr_decay_iters=30', '--eval_interval=10')
    _, evals = read_log(out_dir)
    _, trained_evals = read_log(trained)
    # evaluation batches are the same in every run, so the starting point is the exported model's last eval
    print(f"val loss: exported {trained_evals[-1]['val_loss']:.6f}, at iter 0 here {evals[0]['val_loss']:.6f}")
    assert abs(evals[0]['val_loss'] - trained_evals[-1]['val_loss']) < 1e-5
    ckpt = load_ckpt(out_dir)
    assert ckpt['iter_num'] == 2 and all(s['step'].item() == 2 for s in ckpt['optimizer']['state'].values())


def test_data_of_another_tokenizer_is_refused_in_one_line(trained, tmp_path):
    # the same vocab_size, another tokenizer: meta.json's tokenizer_sha256 tells them apart
    export = str(tmp_path / 'export')
    shutil.copytree(os.path.join(trained, 'export'), export)
    for folder, sha in ((export, 'a' * 64), (write_data(str(tmp_path / 'other'), seed=1), 'b' * 64)):
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
        with open(os.path.join(folder, 'meta.json'), 'w') as f:
            json.dump(dict(meta, tokenizer_sha256=sha), f)
    result = train(str(tmp_path / 'out'), str(tmp_path / 'other'), *TINY, f'--init_from={export}', '--max_iters=1',
                   check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith('error:') and 'another tokenizer' in result.stderr and f'--tokenizer={export}' in result.stderr


@pytest.mark.parametrize('optimizer', [[], ['--muon_lr=0.02']], ids=['adamw', 'muon'])
def test_resume_is_exact(data_dir, tmp_path, optimizer):
    # dropout exercises the torch RNG state; eval_interval=3 puts evaluations inside both halves
    args = [*TINY, *optimizer, '--dropout=0.1', '--lr_decay_iters=8', '--eval_interval=3']
    whole, halves = str(tmp_path / 'whole'), str(tmp_path / 'halves')
    train(whole, data_dir, *args, '--max_iters=8')
    train(halves, data_dir, *args, '--max_iters=4')
    assert load_ckpt(halves)['iter_num'] == 4
    train(halves, data_dir, *args, '--max_iters=8', '--init_from=resume')
    a, b = read_log(whole)[0], read_log(halves)[0]
    print('losses, 8 iterations :', [s['loss'] for s in a])
    print('losses, 4 + 4 resumed:', [s['loss'] for s in b])
    assert [s['iter'] for s in b] == list(range(8))
    assert [s['loss'] for s in a] == [s['loss'] for s in b]
    assert [s['lr'] for s in a] == [s['lr'] for s in b]
    diff = max_diff(load_ckpt(whole)['model'], load_ckpt(halves)['model'])
    print(f'max |weight difference| {diff}')
    assert diff == 0.0


def test_gradient_accumulation_matches_one_big_batch():
    # train.py scales each micro-batch loss by 1/k and sums the gradients over k micro-batches
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          multiple_of=16))
    x, y = torch.randint(0, VOCAB, (8, 16)), torch.randint(0, VOCAB, (8, 16))
    model(x, y)[1].backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    k = 4
    for xm, ym in zip(x.chunk(k), y.chunk(k)):
        (model(xm, ym)[1] / k).backward()
    accumulated = {n: p.grad for n, p in model.named_parameters()}
    diff = max_diff(big, accumulated)
    largest = max(g.abs().max().item() for g in big.values())
    print(f'max |gradient difference| {diff:.3g} (largest gradient {largest:.3g})')
    assert diff < 1e-6


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(data_dir, tmp_path):
    # 4 micro-batches per step: 2 on each rank (gradient sync on the second only) or 4 in one process
    args = [*TINY, '--gradient_accumulation_steps=4', '--max_iters=6', '--lr_decay_iters=6', '--eval_interval=3']
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    train(one, data_dir, *args)
    result = train(two, data_dir, *args, nproc=2)
    assert '2 processes x 2 micro-steps' in result.stdout
    a, b = read_log(one), read_log(two)
    loss_diff = max(abs(x['loss'] - y['loss']) for x, y in zip(a[0], b[0]))
    val_diff = max(abs(x['val_loss'] - y['val_loss']) for x, y in zip(a[1], b[1]))
    ckpt_one, ckpt_two = load_ckpt(one), load_ckpt(two)
    weight_diff = max_diff(ckpt_one['model'], ckpt_two['model'])
    print(f'max difference: step loss {loss_diff:.3g}, val loss {val_diff:.3g}, weights {weight_diff:.3g}')
    assert len(a[0]) == len(b[0]) == 6 and len(a[1]) == len(b[1]) == 3
    assert loss_diff < 1e-5 and val_diff < 1e-5 and weight_diff < 1e-5
    assert a[0][-1]['loss'] < a[0][0]['loss'] - 0.3  # it did learn, so the weights had something to differ by
    assert len(ckpt_two['rng']['data']) == 4 and len(ckpt_two['rng']['torch']) == 2


def test_bf16_autocast_runs_on_cpu(data_dir, tmp_path):
    out_dir = str(tmp_path / 'bf16')
    train(out_dir, data_dir, *MICRO, '--dtype=bfloat16', '--max_iters=3', '--lr_decay_iters=3', '--eval_iters=2')
    steps, evals = read_log(out_dir)
    assert len(steps) == 3 and all(math.isfinite(s['loss']) for s in steps)
    assert all(math.isfinite(e['val_loss']) for e in evals)
    ckpt = load_ckpt(out_dir)
    assert all(t.dtype == torch.float32 for t in ckpt['model'].values())  # autocast keeps fp32 master weights
    assert ckpt['config']['dtype'] == 'bfloat16'


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_auto_dtype_picks_bf16_only_where_its_matmuls_are_faster(data_dir, tmp_path):
    out_dir = str(tmp_path / 'auto')
    result = train(out_dir, data_dir, *MICRO, '--dtype=auto', '--max_iters=2', '--lr_decay_iters=2', '--eval_iters=1')
    chosen = 'bfloat16' if 'bfloat16 on cpu' in result.stdout else 'float32' if 'float32 on cpu' in result.stdout else None
    assert chosen, result.stdout
    seconds = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024).to(dt)
        a @ a
        seconds[dt] = min(timed(lambda: a @ a) for _ in range(5))
    ratio = seconds[torch.bfloat16] / seconds[torch.float32]
    print(f'bf16 / fp32 matmul time here: {ratio:.2f}, train.py chose {chosen}')
    # decisive either way (bf16 units: ~0.5; none: up to ~30), so train.py's quicker check must agree
    if ratio > 1.5 or ratio < 1 / 1.5:
        assert chosen == ('float32' if ratio > 1 else 'bfloat16')


def test_compile_runs_on_cpu(data_dir, tmp_path):
    out_dir = str(tmp_path / 'compiled')
    result = train(out_dir, data_dir, *MICRO, '--compile=True', '--gradient_accumulation_steps=1',
                   '--max_iters=2', '--lr_decay_iters=2', '--eval_iters=2')
    assert 'compiling' in result.stdout
    steps, _ = read_log(out_dir)
    assert len(steps) == 2 and all(math.isfinite(s['loss']) for s in steps)
    assert not any(k.startswith('_orig_mod') for k in load_ckpt(out_dir)['model'])  # the uncompiled names


@pytest.mark.parametrize('args, words', [
    (['--bogus_key=1'], 'unknown key'),
    (['--vocab_size=32'], 'vocab_size 32 is smaller'),
    (['--data_dir=/nonexistent/medslm-data'], 'meta.json not found'),
    (['--init_from=/nonexistent/export'], 'init_from must be'),
], ids=['unknown-key', 'vocab-mismatch', 'missing-data', 'bad-init-from'])
def test_bad_config_is_a_one_line_error(data_dir, tmp_path, args, words):
    result = train(str(tmp_path / 'out'), data_dir, *MICRO, *args, check=False)
    print(result.stderr)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith('error:') and words in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    out_dir = str(tmp_path / 'preempted')
    cmd = [sys.executable, 'train.py', f'--out_dir={out_dir}', f'--data_dir={data_dir}', *MICRO,
           '--max_iters=100000', '--lr_decay_iters=100000', '--eval_interval=100000', '--eval_iters=2']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path, deadline = os.path.join(out_dir, 'log.jsonl'), time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log_path) and len(read_log(out_dir)[0]) >= 3:
            break
        time.sleep(0.1)
    assert not os.path.exists(os.path.join(out_dir, 'ckpt.pt'))  # no evaluation yet, so no checkpoint yet
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a scheduler's and torchrun's: the second must not kill the run before it saves
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert 'stopped by a signal' in stdout and stdout.count('saved ') == 1, stdout
    steps, _ = read_log(out_dir)
    ckpt = load_ckpt(out_dir)
    print(f"stopped after {ckpt['iter_num']} iterations")
    assert ckpt['iter_num'] == len(steps) == len(ckpt['history']['train_loss']) >= 3
    assert not os.path.exists(os.path.join(out_dir, 'export'))  # a preempted run is not finished


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(trained, data_dir, tmp_path):
    out_dir = str(tmp_path / 'diverged')
    shutil.copytree(trained, out_dir)
    before = sha(os.path.join(out_dir, 'ckpt.pt'))
    # a learning rate of 1e30 sends the weights, then the loss, to inf / nan within a few steps
    result = train(out_dir, data_dir, *TINY, '--init_from=resume', '--learning_rate=1e30', '--min_lr=1e30',
                   '--warmup_iters=0', '--max_iters=60', '--lr_decay_iters=60', '--eval_interval=10', check=False)
    print(result.stderr)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and 'error: the loss became' in result.stderr
    assert sha(os.path.join(out_dir, 'ckpt.pt')) == before
    steps, _ = read_log(out_dir)
    assert not math.isfinite(steps[-1]['loss']) and steps[-1]['iter'] < 40  # stopped at the first bad step


def test_a_bf16_checkpoint_resumes_in_fp16_with_a_fresh_gradient_scaler(data_dir, tmp_path):
    out_dir = str(tmp_path / 'run')
    train(out_dir, data_dir, *MICRO, '--dtype=bfloat16', '--max_iters=2', '--eval_interval=2')
    assert load_ckpt(out_dir)['scaler'] == {}  # the disabled scaler's state
    train(out_dir, data_dir, *MICRO, '--dtype=float16', '--init_from=resume', '--max_iters=4', '--eval_interval=2')
    assert load_ckpt(out_dir)['iter_num'] == 4 and load_ckpt(out_dir)['scaler']


def test_more_ranks_than_micro_steps_split_the_batch_and_match_one_process(data_dir, tmp_path):
    # 2 gloo ranks x 1 micro-step of 4 sequences become 2 ranks x 1 x 2: the slots of a 1-process run of 2 x 2
    common = [*MICRO, '--max_iters=4', '--eval_interval=4']
    train(str(tmp_path / 'one'), data_dir, *common, '--gradient_accumulation_steps=2', '--batch_size=2')
    result = train(str(tmp_path / 'two'), data_dir, *common, '--gradient_accumulation_steps=1', '--batch_size=4',
                   nproc=2)
    assert '2 processes x 1 micro-steps x 2' in result.stdout, result.stdout
    one, two = read_log(str(tmp_path / 'one'))[0], read_log(str(tmp_path / 'two'))[0]
    diff = max(abs(a['loss'] - b['loss']) for a, b in zip(one, two))
    print(f'max loss difference {diff:.2e}')
    assert len(one) == len(two) == 4 and diff < 1e-4
