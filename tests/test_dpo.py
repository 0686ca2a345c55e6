"""
DPO end to end on tiny CPU models: preference pairs read and rendered with the prompt masked, the loss and its
rewards by hand, train.py learning a preference (with and without LoRA) against the starting model, exact resume,
the base untouched under LoRA, bad lines, and tasks.py's pairs from the corpus. pytest tests/test_dpo.py -s prints the
measured figures.
"""
import copy
import json
import math
import os

import pytest
import torch

import tasks
from chat import DPO_STATS as STATS, dpo_loss, is_pairs, pair_windows, read_pairs, render, render_pair
from lora import adapters_off, add_lora
from checkpoint import load_model
from helpers import (ANSWER, DOCS, QUESTION, SFT, load_ckpt, max_diff, random_model, read_log, sft, train, write_data,
                     write_jsonl)
from model import sequence_logprobs
from tokenizer import train_bpe

# Each prompt's chosen reply is one text of the fixture, its rejected reply another: the preference to learn
PAIRS = [{'prompt': QUESTION, 'chosen': ANSWER, 'rejected': 'Aspirin, twice daily.'},
         {'prompt': 'Which drug inhibits cyclooxygenase?', 'chosen': 'Aspirin.', 'rejected': 'Metformin.'},
         {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Treat COPD?'}],
          'chosen': 'Bronchodilators.', 'rejected': 'Insulin.'}]
DPO = ['--lr_decay_iters=8', '--eval_interval=4', '--eval_iters=2', '--dpo_beta=0.5']
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp('data')), train_bpe(DOCS, 400), splits={'val': DOCS[:2]})


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('pairs'))
    write_jsonl(os.path.join(folder, 'train.jsonl'), PAIRS * 4)
    write_jsonl(os.path.join(folder, 'val.jsonl'), PAIRS)
    return folder


def weights(out_dir):
    return load_ckpt(out_dir)['model']


# ----------------------------------------------------------------------------- data and loss


def test_a_pair_masks_the_prompt_and_counts_exactly_the_reply_and_its_end(tok):
    messages = [{'role': 'user', 'content': 'Dose?'}, {'role': 'assistant', 'content': '500 mg.'},
                {'role': 'user', 'content': 'Daily?'}]  # an earlier assistant turn is prompt too
    (ids, mask), (rids, rmask) = render_pair(messages, 'Twice.', 'Never, ever.', tok)
    full, _ = render(messages + [{'role': 'assistant', 'content': 'Twice.'}], tok)
    assert ids == full  # the chat template's own rendering of the conversation with the reply
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == 'Twice.<|end|>'
    assert tok.decode([t for t, m in zip(rids, rmask) if m]) == 'Never, ever.<|end|>'
    prompt_length = mask.index(1)
    assert ids[:prompt_length] == rids[:prompt_length] and ids[prompt_length - 1] == tok.chat['assistant']
    # a changed prompt token changes no reply mask, and a prompt of another length only shifts it
    for other, same_length in (('daily?', True), ('Weekly?', False)):
        changed = [{**m, 'content': m['content'].replace('Daily?', other)} for m in messages]
        (cids, cmask), (_, crmask) = render_pair(changed, 'Twice.', 'Never, ever.', tok)
        assert cids != ids and (len(cids) == len(ids)) == same_length
        assert sum(cmask) == sum(mask) and cmask[-sum(mask):] == mask[-sum(mask):] and not any(cmask[:-sum(mask)])
        assert crmask[-sum(rmask):] == rmask[-sum(rmask):] and not any(crmask[:-sum(rmask)])
        if same_length:
            assert cmask == mask and crmask == rmask
    x, y, stats = pair_windows([{'messages': messages, 'chosen': 'Twice.', 'rejected': 'Never, ever.'}], tok, 40)
    counted = [(y[0, s] != -1).sum() for s in (0, 1)]
    assert counted == [sum(mask), sum(rmask)] and stats['trained'] == sum(counted)
    assert (y[0, 0, :prompt_length - 1] == -1).all()  # no target inside the prompt counts


def test_sequence_logprobs_sum_the_counted_targets_of_a_full_log_softmax():
    torch.manual_seed(0)
    h, weight = torch.randn(3, 10, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (3, 10))
    targets[:, :4] = -1
    targets[2, 7:] = -1
    logp = torch.log_softmax(h @ weight.t(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(targets != -1, logp, 0.0).sum(-1)
    diff = (sequence_logprobs(h, weight, targets) - expected).abs().max().item()
    print(f'summed log-probs vs a full log-softmax: max abs difference {diff:.2e}')
    assert diff < 1e-5


def test_dpo_loss_is_log_2_with_zero_rewards_at_the_start_and_follows_the_formula():
    logps = torch.tensor([[-5.0, -7.0], [-3.0, -2.0]])
    loss, stats = dpo_loss(logps, logps.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and stats.tolist()[1:] == [0.0, 0.0, 0.5, 0.0]
    ref = torch.tensor([[-6.0, -6.0], [-3.0, -3.0]])
    loss, stats = dpo_loss(logps, ref, beta=0.5)
    margins = torch.tensor([0.5 * ((-5 + 6) - (-7 + 6)), 0.5 * ((-3 + 3) - (-2 + 3))])  # 1.0, -0.5
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item())
    assert stats.tolist()[1:] == pytest.approx([0.5 * (1 + 0) / 2, 0.5 * (-1 + 1) / 2, 0.5, margins.mean().item()])


def test_adapters_off_compute_the_base_exactly(data_dir):
    base = random_model(data_dir)
    adapted = add_lora(copy.deepcopy(base), rank=4, alpha=8)
    for m in adapted.modules():
        if hasattr(m, 'lora_B'):
            torch.nn.init.normal_(m.lora_B)
    idx = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(adapted(idx)[0], base(idx)[0])
    with adapters_off(adapted):
        assert torch.equal(adapted(idx)[0], base(idx)[0])
    assert not torch.equal(adapted(idx)[0], base(idx)[0])  # back on after the block


@pytest.mark.parametrize('line, words', [
    ('{"prompt": "hi", "chosen": "a"', 'not JSON'),
    ('{"prompt": "hi", "rejected": "b"}', '"chosen" must be a non-empty string'),
    ('{"prompt": "hi", "chosen": "a", "rejected": "  "}', '"rejected" must be a non-empty string'),
    ('{"prompt": "hi", "chosen": "same", "rejected": "same"}', 'the same text'),
    ('{"chosen": "a", "rejected": "b"}', '"prompt"'),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "chosen": "a", '
     '"rejected": "b"}', "the user's"),
    ('{"messages": [{"role": "nurse", "content": "hi"}], "chosen": "a", "rejected": "b"}', "role 'nurse'"),
], ids=['not-json', 'no-chosen', 'empty-rejected', 'same-replies', 'no-prompt', 'ends-with-assistant',
        'unknown-role'])
def test_a_bad_pair_line_is_a_one_line_error_naming_file_and_line_or_skipped(tmp_path, line, words):
    path = write_jsonl(str(tmp_path / 'train.jsonl'), [PAIRS[0], line, PAIRS[1]])
    with pytest.raises(SystemExit) as e:
        read_pairs(path)
    message = str(e.value.code)
    print(message)
    assert message.startswith(f'error: {path}:2: ') and words in message and '\n' not in message
    records, skipped = read_pairs(path, skip_bad=True)
    assert skipped == 1 and [r['chosen'] for r in records] == [ANSWER, 'Aspirin.']


def test_pairs_that_do_not_fit_whole_are_dropped_and_counted(tok, tmp_path):
    long = {'prompt': DOCS[0] * 2, 'chosen': 'Yes.', 'rejected': DOCS[1] * 3}
    records, _ = read_pairs(write_jsonl(str(tmp_path / 'train.jsonl'), [PAIRS[0], long]))
    x, y, stats = pair_windows(records, tok, block_size=48)
    assert (stats['pairs'], stats['dropped']) == (2, 1) and x.shape == y.shape == (1, 2, 48)


# ----------------------------------------------------------------------------- DPO through train.py


@pytest.fixture(scope='module')
def dpo_run(base, pairs, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('dpo') / 'out')
    result = sft(out_dir, pairs, f'--init_from={base}', '--max_iters=8', *DPO)
    print(result.stdout)
    return out_dir, result.stdout


def test_dpo_starts_at_log_2_and_raises_the_margin_and_reward_accuracy(dpo_run):
    out_dir, stdout = dpo_run
    assert 'train.jsonl: 12 preference pairs' in stdout and 'reward accuracy' in stdout
    steps, evals = read_log(out_dir)
    first, last = steps[0], steps[-1]
    print(f"step 0: loss {first['loss']:.6f}, rewards {first['rewards_chosen']:.2e} / {first['rewards_rejected']:.2e}; "
          f"val accuracy {evals[0]['val_reward_accuracy']} -> {evals[-1]['val_reward_accuracy']}, "
          f"margin {evals[0]['val_margin']:.4f} -> {evals[-1]['val_margin']:.4f}, loss {last['loss']:.4f}")
    assert set(first) >= {'loss', 'rewards_chosen', 'rewards_rejected', 'reward_accuracy', 'margin'}
    assert first['loss'] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference
    assert abs(first['rewards_chosen']) < 1e-6 and abs(first['margin']) < 1e-6
    assert evals[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-6) and evals[0]['val_reward_accuracy'] == 0.5
    assert evals[-1]['val_margin'] > 1.0 and evals[-1]['val_reward_accuracy'] == 1.0
    assert evals[-1]['val_loss'] < 0.5 and last['loss'] < first['loss']
    assert load_model(os.path.join(out_dir, 'export')).config.vocab_size == 400  # an ordinary export


def test_full_dpo_checkpoints_its_reference_by_path_and_sha256(dpo_run, base):
    ckpt = load_ckpt(dpo_run[0])
    assert ckpt['dpo']['reference']['base'] == os.path.abspath(base)
    assert len(ckpt['dpo']['reference']['base_sha256']) == 64


@pytest.mark.parametrize('lora', [[], ['--lora_rank=4', '--lora_alpha=8', '--lora_dropout=0.1']],
                         ids=['full', 'lora'])
def test_dpo_resume_equals_an_uninterrupted_run(base, pairs, tmp_path, lora):
    args = [f'--init_from={base}', *DPO, '--dropout=0.1', *lora]  # dropout: the random streams resume too
    whole, halves = str(tmp_path / 'whole'), str(tmp_path / 'halves')
    sft(whole, pairs, *args, '--max_iters=8')
    sft(halves, pairs, *args, '--max_iters=4')
    sft(halves, pairs, *args, '--max_iters=8', '--init_from=resume')
    (a, ea), (b, eb) = read_log(whole), read_log(halves)
    timings = ('tokens_per_s', 'mfu', 'elapsed_s')
    assert len(b) == 8 and [{k: v for k, v in s.items() if k not in timings} for s in a] == \
           [{k: v for k, v in s.items() if k not in timings} for s in b]  # every logged figure but the timings
    assert ea[-1] == eb[-1]
    diff = max_diff(weights(whole), weights(halves))
    print(f'DPO ({"lora" if lora else "full"}) 8 steps vs 4 + 4 resumed: max |weight difference| {diff}')
    assert diff == 0.0 and ea[-1]['val_margin'] > 0


def test_dpo_with_lora_trains_only_adapters_and_leaves_the_base_bit_for_bit(base, pairs, tmp_path):
    before = load_model(base).state_dict()
    out_dir = str(tmp_path / 'lora')
    sft(out_dir, pairs, f'--init_from={base}', '--max_iters=8', *DPO, '--lora_rank=4', '--lora_alpha=8')
    ckpt = load_ckpt(out_dir)
    assert ckpt['dpo'] == {'reference': None}  # the reference is the base itself, adapters off
    assert all('lora_' in k for k in ckpt['model'])
    assert load_model(base).state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in load_model(base).state_dict().items())
    _, evals = read_log(out_dir)
    print(f"LoRA DPO: val margin {evals[0]['val_margin']:.4f} -> {evals[-1]['val_margin']:.4f}, "
          f"accuracy {evals[0]['val_reward_accuracy']} -> {evals[-1]['val_reward_accuracy']}")
    assert evals[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]['val_margin'] > evals[0]['val_margin'] and evals[-1]['val_reward_accuracy'] == 1.0


def test_dpo_on_two_processes_matches_one_process_with_the_same_global_batch(base, pairs, tmp_path):
    args = [f'--init_from={base}', *DPO, '--max_iters=4', '--gradient_accumulation_steps=2']
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    sft(one, pairs, *args)
    result = train(two, pairs, *SFT, *args, nproc=2)  # train.py's flags as sft() gives them, under torchrun
    assert '2 processes x 1 micro-steps x 4 pairs x 2' in result.stdout
    (a, ea), (b, eb) = read_log(one), read_log(two)
    diff = max(abs(x[k] - y[k]) for x, y in zip(a + ea, b + eb) for k in x if k in STATS or k.startswith('val_'))
    weight_diff = max_diff(weights(one), weights(two))
    print(f'DPO, 1 vs 2 processes: max difference of a logged figure {diff:.3g}, of a weight {weight_diff:.3g}')
    assert len(b) == 4 and diff < 1e-5 and weight_diff < 1e-5 and ea[-1]['val_margin'] > 0


def test_dpo_refuses_lora_that_trains_the_embeddings_and_bad_pair_lines(base, pairs, tmp_path):
    result = sft(str(tmp_path / 'a'), pairs, f'--init_from={base}', '--max_iters=1', '--lora_rank=4',
                 '--lora_train_embeddings=True', check=False)
    assert result.returncode != 0 and result.stderr.startswith('error: DPO with LoRA')
    bad = str(tmp_path / 'bad')
    write_jsonl(os.path.join(bad, 'train.jsonl'), [PAIRS[0], {'prompt': 'a', 'chosen': 'b', 'rejected': 'b'}])
    write_jsonl(os.path.join(bad, 'val.jsonl'), PAIRS)
    assert is_pairs(os.path.join(bad, 'train.jsonl'))
    result = sft(str(tmp_path / 'b'), bad, f'--init_from={base}', '--max_iters=1', check=False)
    print(result.stderr)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert f"{os.path.join(bad, 'train.jsonl')}:2: \"chosen\" and \"rejected\" are the same text" in result.stderr


# ----------------------------------------------------------------------------- pairs from the corpus


def test_tasks_pairs_prefer_the_right_option_and_each_documents_own_answer(corpus, tmp_path):
    out, again = str(tmp_path / 'pairs'), str(tmp_path / 'again')
    for folder in (out, again):
        tasks.main(['--data_dir', corpus['data'], '--out', folder, '--pairs'])
    for split in ('train', 'val', 'test'):
        pairs = [json.loads(line) for line in open(os.path.join(out, f'{split}.jsonl'))]
        assert open(os.path.join(again, f'{split}.jsonl')).read() == open(os.path.join(out, f'{split}.jsonl')).read()
        items = {(i['task'], i['doc_id'], i['messages'][0]['content']): i for i in corpus['items'][split]}
        split_answers = {(i['task'], i['messages'][1]['content']) for i in items.values()}
        # every item gives a pair, but a generation item whose task's answers are all its own (the fixture's MeSH
        # topics and keywords are the same for every document) has no other answer to reject
        distinct = {t: len({a for (task, a) in split_answers if task == t}) for t in tasks.GENERATION}
        expected = [k for k in items if k[0] not in tasks.GENERATION or distinct[k[0]] > 1]
        print(f'{split}: {len(pairs)} pairs of {len(items)} items')
        assert len(pairs) == len(expected) and {p['task'] for p in pairs} >= {'title', 'title_choice'}
        for p in pairs:
            i = items[(p['task'], p['doc_id'], p['prompt'])]
            assert p['chosen'] == i['messages'][1]['content'] and p['rejected'] != p['chosen']
            if 'options' in i:  # a wrong option of the same item
                assert p['rejected'] in i['options']
            else:  # another document's answer, of this split
                assert (p['task'], p['rejected']) in split_answers
        records, _ = read_pairs(os.path.join(out, f'{split}.jsonl'))
        assert len(records) == len(pairs)
