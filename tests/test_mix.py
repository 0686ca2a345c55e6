"""
Data mixing (train.py's mix): token shards and conversations in one run's batches, by weight, each window keeping
its own targets (a conversation's loss mask), drawn deterministically, and validated on data_dir alone.
"""
import json
import os

import numpy as np
import pytest
import torch

from data import chat_split, draw, mix_split, parse_mix, shard_split
from helpers import DOCS, SFT, chat_data, read_log, run_error, train, write_data
from tokenizer import train_bpe


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    splits = {'train': DOCS * 20, 'val': DOCS[:3]}
    return write_data(str(tmp_path_factory.mktemp('data')), train_bpe(DOCS, 400), splits=splits)


@pytest.fixture(scope='module')
def chat(tmp_path_factory):
    return chat_data(str(tmp_path_factory.mktemp('chat')))


def mixed(data_dir, chat, weight, block_size=32):
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    return mix_split(shard_split(data_dir, meta, 'train', block_size), [(chat, weight)], data_dir, meta, block_size,
                     verbose=False)


@pytest.mark.parametrize('mix, words', [('data', 'folder:weight'), ('a:0', 'between 0 and 1'),
                                        ('a:0.6,b:0.5', 'sum to 1.1'), (':0.5', 'needs a folder')])
def test_a_bad_mix_is_a_one_line_error(mix, words):
    with pytest.raises(SystemExit) as e:
        parse_mix(mix)
    assert str(e.value.code).startswith('error: ') and words in str(e.value.code)


def test_parse_mix_reads_folders_with_colons_and_weights():
    assert parse_mix('') == []
    assert parse_mix('data/tasks:0.25,/tmp/a:b:0.1') == [('data/tasks', 0.25), ('/tmp/a:b', 0.1)]


def test_a_mix_draws_each_part_by_its_weight_and_keeps_the_loss_masks(data_dir, chat, tok):
    split = mixed(data_dir, chat, 0.3)
    generator = torch.Generator().manual_seed(0)
    chat_rows = shard_rows = 0
    for _ in range(50):
        x, y = draw(split, 16, 32, generator)
        assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.long
        masked = (y == -1).any(dim=1)  # conversations: the prompt and padding carry no target; text windows all do
        chat_rows += int(masked.sum())
        shard_rows += int((~masked).sum())
        assert torch.equal(x[~masked, 1:], y[~masked, :-1])  # a text window's targets are its next tokens
    share = chat_rows / (chat_rows + shard_rows)
    assert abs(share - 0.3) < 0.05, share  # 800 windows: 3 standard errors is 0.049
    assert tok.chat['assistant'] in x[masked].tolist()[0]


def test_a_mix_draws_the_same_windows_from_the_same_seed(data_dir, chat):
    split = mixed(data_dir, chat, 0.5)
    a, b = (draw(split, 8, 32, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mix_folders_of_another_tokenizer_or_of_pairs_are_refused_in_one_line(data_dir, tmp_path):
    other = write_data(str(tmp_path / 'other'), train_bpe(DOCS[::-1] + ['zebra quagga'], 350),
                       splits={'train': DOCS, 'val': DOCS[:1]})
    pairs = tmp_path / 'pairs'
    pairs.mkdir()
    (pairs / 'train.jsonl').write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    for folder, words in ((other, 'another tokenizer'), (str(pairs), 'preference pairs do not mix'),
                          (str(tmp_path / 'none'), 'neither token shards')):
        message = run_error('train.py', f'--data_dir={data_dir}', f'--mix={folder}:0.5', '--out_dir=' +
                            str(tmp_path / 'out'), '--device=cpu', '--compile=False', '--block_size=32', '--max_iters=1')
        assert words in message, message


def test_pre_instruction_tuning_trains_from_scratch_on_text_and_tasks_and_validates_on_the_text(
        data_dir, chat, tmp_path):
    args = [*SFT, '--n_layer=1', '--n_head=2', '--n_embd=32', '--multiple_of=16', '--max_iters=30',
            '--eval_interval=15', '--lr_decay_iters=30', f'--mix={chat}:0.5']
    result = train(str(tmp_path / 'mixed'), data_dir, *args)
    assert f'batches mix 50% of it, 50% {chat}' in result.stdout
    steps, evals = read_log(str(tmp_path / 'mixed'))
    assert steps[-1]['loss'] < steps[0]['loss'] - 1.0
    assert all('val_bpb' in e for e in evals)  # data_dir's val split alone: bits per byte still mean something
    # resumed half-way, the run draws the same mixed batches: the same losses
    train(str(tmp_path / 'resumed'), data_dir, *args, '--max_iters=15')
    train(str(tmp_path / 'resumed'), data_dir, *args, '--init_from=resume')
    resumed, _ = read_log(str(tmp_path / 'resumed'))
    assert np.allclose([r['loss'] for r in resumed], [r['loss'] for r in steps], rtol=0, atol=0)
