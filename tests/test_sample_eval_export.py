"""Tests of sample.py, eval.py and export.py on tiny random CPU models: pytest tests/test_sample_eval_export.py

The scripts run as they do from the command line (in this process through runpy, which skips an interpreter
start-up per call; one test runs a real subprocess) on checkpoints and exports the tests write in train.py's
format. transformers is the reference the Hugging Face export is checked against."""
import dataclasses
import json
import math
import os
import pty
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from checkpoint import load_model
from helpers import DOCS, EOS, ROOT, assert_close, random_model, run, run_error, write_data, write_export
from tokenizer import load_tokenizer, train_bpe

VAL_DOC = 'Metformin lowers glucose.'
TEXTS = DOCS + ['  two  spaces,\ttabs\nand newlines\n\n', "it's we'll they've I'm", 'x²+y² = z² 🙂 naïve café',
                'HbA1c 7.5%; eGFR < 30 mL/min/1.73 m²', 'a literal [EOS] or <|endoftext|> is text', '']
CLASSIC = dict(norm='layernorm', pos_embedding='learned', mlp='gelu', n_kv_head=4)
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """prepare.py's ByteLevel BPE trained on DOCS, a test split several windows long and a val split within one."""
    tokenizer = train_bpe(DOCS, 400)
    return write_data(str(tmp_path_factory.mktemp('data')), tokenizer, splits={'test': DOCS, 'val': [VAL_DOC]})


def write_ckpt(folder, model, data_dir):
    """out_dir/ckpt.pt as train.py writes it."""
    os.makedirs(folder)
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    torch.save(dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config), iter_num=0,
                    best_val_loss=0.0, config=dict(data_dir=data_dir), data_dir=data_dir, meta=meta),
               os.path.join(folder, 'ckpt.pt'))
    return str(folder)


def samples(out):
    return out.split('\n---------------\n')[:-1]


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize('arch, kwargs', [
    ('LlamaForCausalLM', dict(n_kv_head=2, tie_embeddings=True)),
    ('LlamaForCausalLM', dict(n_kv_head=4, tie_embeddings=False, bias=True)),
    ('GPT2LMHeadModel', dict(CLASSIC, bias=True, tie_embeddings=True)),
    ('GPT2LMHeadModel', dict(CLASSIC, bias=False, tie_embeddings=False, intermediate_size=48, norm_eps=1e-6)),
], ids=['llama-gqa-tied', 'llama-mha-untied-bias', 'gpt2-tied-bias', 'gpt2-untied-nobias'])
def test_hf_export_gives_our_logits_in_transformers(tmp_path, data_dir, arch, kwargs):
    from transformers import AutoModelForCausalLM
    model = random_model(data_dir, **kwargs)
    out_dir = write_ckpt(tmp_path / 'out', model, data_dir)
    run('export.py', f'--out_dir={out_dir}', '--format=hf')
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, 'hf')).eval()
    assert type(hf).__name__ == arch and hf.dtype == torch.float32
    idx = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model.output(model.hidden(idx)), hf(idx).logits, 1e-4, f'{arch} {kwargs} logits')


def test_hf_tokenizer_encodes_and_decodes_like_ours(tmp_path, data_dir, tok):
    from transformers import AutoTokenizer
    out_dir = write_export(tmp_path / 'export', random_model(data_dir), data_dir)
    run('export.py', f'--out_dir={out_dir}', '--format=hf')
    hf = AutoTokenizer.from_pretrained(os.path.join(out_dir, 'hf'))
    assert (hf.eos_token, hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == ('[EOS]', EOS, 2, 0)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == tok.decode(ids) == text


def test_hf_gpt2_tokenizer_rebuilt_from_tiktoken_ranks_encodes_like_ours(tmp_path):
    from transformers import AutoTokenizer
    data = write_data(str(tmp_path / 'data'), None, dict(tokenizer='gpt2', eos_id=50256, bos_id=50256, pad_id=None,
                                                        unk_id=None, tokenizer_file=None))
    ours = load_tokenizer(data)
    out_dir = write_ckpt(tmp_path / 'out', random_model(data, n_embd=16, n_layer=1), data)
    run('export.py', f'--out_dir={out_dir}', '--format=hf')
    hf = AutoTokenizer.from_pretrained(os.path.join(out_dir, 'hf'))
    assert (hf.eos_token, hf.eos_token_id, len(hf)) == ('<|endoftext|>', 50256, 50257)
    for text in TEXTS + [' '.join(DOCS) * 3, 'pneumonoultramicroscopicsilicovolcanoconiosis   \n\n\t x']:
        ids = ours.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text


@pytest.mark.parametrize('kwargs', [dict(norm='layernorm'), dict(CLASSIC, n_kv_head=2), dict(mlp='gelu')])
def test_hf_export_of_a_mixed_block_is_a_one_line_error(tmp_path, data_dir, kwargs):
    out_dir = write_ckpt(tmp_path / 'out', random_model(data_dir, **kwargs), data_dir)
    assert 'safetensors' in run_error('export.py', f'--out_dir={out_dir}', '--format=hf')
    assert os.listdir(out_dir) == ['ckpt.pt']


def test_safetensors_export_loads_back_and_is_replaced_atomically(tmp_path, data_dir):
    model = random_model(data_dir)
    out_dir = write_ckpt(tmp_path / 'out', model, data_dir)
    for _ in range(2):  # the second run replaces the first folder
        run('export.py', f'--out_dir={out_dir}', '--format=safetensors')
    assert sorted(os.listdir(out_dir)) == ['ckpt.pt', 'safetensors']
    folder = os.path.join(out_dir, 'safetensors')
    assert set(os.listdir(folder)) == {'model.safetensors', 'config.json', 'meta.json', 'tokenizer.json',
                                       'training_config.json', 'README.md'}
    idx = torch.randint(0, model.config.vocab_size, (1, 64))
    with torch.no_grad():
        assert_close(model.output(model.hidden(idx)), load_model(folder).output(load_model(folder).hidden(idx)), 0,
                     'reloaded logits')


# ----------------------------------------------------------------------------- eval


def brute_force_nll(model, data, L, stride):
    """Per-token losses, one forward per target, with the context the documented window schedule gives it:
    windows of L inputs end at L, L + stride, ..., n; each scores the targets its predecessor did not."""
    n = len(data) - 1
    ends = list(range(L, n, stride)) + [n]
    total, prev = 0.0, 0
    with torch.no_grad():
        for end in ends:
            for j in range(prev, end):  # target data[j + 1] given data[end - L:j + 1]
                h = model.hidden(data[None, end - L:j + 1])
                total -= torch.log_softmax(model.output(h[0, -1]).double(), -1)[data[j + 1]].item()
            prev = end
    return total / n


@pytest.mark.parametrize('stride', [1, 7, 32, 64])
def test_eval_scores_every_token_once_with_the_windows_context(tmp_path, data_dir, stride, capsys):
    model = random_model(data_dir)
    out_dir = write_ckpt(tmp_path / 'out', model, data_dir)
    run('eval.py', f'--out_dir={out_dir}', f'--stride={stride}', '--batch_size=3')
    capsys.readouterr()
    with open(os.path.join(out_dir, 'eval_test.json')) as f:
        res = json.load(f)
    data = torch.from_numpy(np.fromfile(os.path.join(data_dir, 'test.bin'), dtype=np.uint16).astype(np.int64))
    data = torch.cat([torch.tensor([EOS]), data])
    assert len(data) - 1 > 3 * 64 and res['tokens'] == len(data) - 1
    expected = brute_force_nll(model, data, 64, stride)
    print(f'stride {stride}: eval {res["loss"]:.6f} brute force {expected:.6f} over {res["windows"]} windows')
    assert abs(res['loss'] - expected) < 1e-5
    with open(os.path.join(data_dir, 'meta.json')) as f:
        test_split = json.load(f)['splits']['test']
    assert math.isclose(res['bits_per_byte'], res['loss'] / math.log(2) * test_split['tokens'] / test_split['bytes'])
    assert math.isclose(res['perplexity'], math.exp(res['loss']))


def test_eval_of_a_split_within_one_window_is_the_full_context_loss(tmp_path, data_dir, capsys):
    model = random_model(data_dir, **CLASSIC)
    out_dir = write_export(tmp_path / 'export', model, data_dir)
    data = torch.cat([torch.tensor([EOS]), torch.tensor(load_tokenizer(data_dir).encode(VAL_DOC) + [EOS])])
    with torch.no_grad():
        _, full = model(data[None, :-1], data[None, 1:])
    for stride in (1, 64):
        run('eval.py', f'--out_dir={out_dir}', f'--data_dir={data_dir}', '--split=val', f'--stride={stride}',
            f'--out_file={tmp_path}/val.json')
        assert 'perplexity' in capsys.readouterr().out
        with open(tmp_path / 'val.json') as f:
            res = json.load(f)
        print(f'stride {stride}: eval {res["loss"]:.6f} full context {full.item():.6f}')
        assert res['windows'] == 1 and res['tokens'] == len(data) - 1 and abs(res['loss'] - full.item()) < 1e-5


def test_eval_errors_are_one_line(tmp_path, data_dir):
    out_dir = write_ckpt(tmp_path / 'out', random_model(data_dir), data_dir)
    run_error('eval.py', f'--out_dir={tmp_path}/missing')
    run_error('eval.py', f'--out_dir={out_dir}', '--split=train')
    run_error('eval.py', f'--out_dir={out_dir}', '--stride=65')
    run_error('eval.py', f'--out_dir={out_dir}', f'--mcq={tmp_path}/missing.jsonl')
    (tmp_path / 'q.jsonl').write_text(json.dumps(dict(question='Q?', options=['yes', 'no'], answer='C')) + '\n')
    assert 'q.jsonl:1' in run_error('eval.py', f'--out_dir={out_dir}', f'--mcq={tmp_path}/q.jsonl')


def test_mcq_scores_are_option_log_likelihoods_and_accuracy_counts_answers(tmp_path, data_dir, tok, capsys):
    model = random_model(data_dir)
    out_dir = write_ckpt(tmp_path / 'out', model, data_dir)
    # the three shapes: PubMedQA (context, yes/no/maybe text answer), MedQA (dict, letter), MedMCQA (list, index)
    questions = [
        dict(context='Metformin lowers hepatic glucose output.', question='Does metformin lower glucose?',
             options=['yes', 'no', 'maybe']),
        dict(question='Which drug inhibits cyclooxygenase?', options={'A': 'Aspirin', 'B': 'Insulin', 'C': 'Metformin',
                                                                      'D': 'Heparin', 'E': 'Warfarin'}),
        dict(question='Sjögren\'s syndrome affects the', options=['exocrine glands', 'heart', 'kidney', 'bone']),
        dict(question='Hypertension increases the risk of', options=['stroke', 'nothing']),
    ]

    def logprob(prompt, option):  # the documented prompt, one option at a time, no padding
        context, cont = [EOS] + tok.encode(prompt), tok.encode(' ' + option)
        with torch.no_grad():
            h = model.hidden(torch.tensor([context + cont[:-1]]))
            logp = torch.log_softmax(model.output(h).double(), -1)[0]  # logp[t] predicts token t + 1
        return sum(logp[len(context) - 1 + i, token].item() for i, token in enumerate(cont))

    expected, answers = [], []
    for i, q in enumerate(questions):
        opts = list(q['options'].values()) if isinstance(q['options'], dict) else q['options']
        prompt = (q['context'] + '\n' if 'context' in q else '') + f"Question: {q['question']}\nAnswer:"
        scores = [logprob(prompt, o) for o in opts]
        best = int(np.argmax(scores))
        answers.append(best if i % 2 == 0 else (best + 1) % len(opts))  # half the answers are the model's choice
        q['answer'] = [opts[answers[-1]], 'ABCDE'[answers[-1]], answers[-1], 'ABCDE'[answers[-1]]][i]
        expected.append((scores, int(np.argmax([s / (len(o) + 1) for s, o in zip(scores, opts)]))))
    with open(tmp_path / 'q.jsonl', 'w') as f:
        f.write(''.join(json.dumps(q, ensure_ascii=False) + '\n' for q in questions))
    run('eval.py', f'--out_dir={out_dir}', f'--mcq={tmp_path}/q.jsonl')
    assert 'accuracy' in capsys.readouterr().out
    with open(os.path.join(out_dir, 'eval_q.json')) as f:
        res = json.load(f)
    diff = max(abs(a - b) for r, (e, _) in zip(res['results'], expected) for a, b in zip(r['scores'], e))
    print(f'option log-likelihoods: max abs difference {diff:.2e}')
    assert diff < 1e-4 and res['questions'] == 4 and res['accuracy'] == 0.5
    assert [r['answer'] for r in res['results']] == answers
    assert [r['pred_norm'] for r in res['results']] == [norm for _, norm in expected]


# ----------------------------------------------------------------------------- sample


def test_sampling_is_seeded(tmp_path, data_dir, capsys):
    out_dir = write_ckpt(tmp_path / 'out', random_model(data_dir), data_dir)
    outs = []
    for seed in (1, 1, 2):
        run('sample.py', f'--out_dir={out_dir}', '--start=Metformin is', '--num_samples=2', '--max_new_tokens=30',
            '--temperature=1.0', '--top_k=None', f'--seed={seed}')
        outs.append(samples(capsys.readouterr().out))
    assert len(outs[0]) == 2 and all(s.startswith('Metformin is') for s in outs[0])
    assert outs[0] == outs[1] and outs[0][0] != outs[0][1] and outs[0] != outs[2]


def test_temperature_zero_from_a_prompt_file_is_greedy_full_forward_decoding(tmp_path, data_dir, tok, capsys):
    model = random_model(data_dir, seed=3)
    out_dir = write_export(tmp_path / 'export', model, data_dir)
    prompt = 'Patients aged ≥ 65 years\nwith diabetes'
    (tmp_path / 'prompt.txt').write_text(prompt, encoding='utf-8')
    ids = [EOS] + tok.encode(prompt)
    x, new = torch.tensor([ids]), []
    with torch.no_grad():
        while len(new) < 40:
            token = model.output(model.hidden(x))[0, -1].argmax().item()
            if token == EOS:
                break
            new.append(token)
            x = torch.cat([x, torch.tensor([[token]])], dim=1)
    for kv_cache in (True, False):
        run('sample.py', f'--out_dir={out_dir}', f'--start=FILE:{tmp_path}/prompt.txt', '--num_samples=2',
            '--max_new_tokens=40', '--temperature=0', f'--kv_cache={kv_cache}')
        assert samples(capsys.readouterr().out) == [prompt + tok.decode(new)] * 2


def test_sampling_stops_at_eos_and_streams_characters_split_across_tokens(tmp_path, data_dir, capsys):
    from tokenizers import Tokenizer
    # a model whose next-token distribution is fixed: 'é' is bytes C3 A9, sampled as two single-byte tokens
    byte_token = Tokenizer.from_file(os.path.join(data_dir, 'tokenizer.json')).token_to_id
    c3, a9 = byte_token('Ã'), byte_token('©')  # ByteLevel's printable stand-ins for bytes 0xC3 and 0xA9
    model = random_model(data_dir, **CLASSIC, bias=True)
    logits = torch.full((model.config.vocab_size,), -30.0)
    logits[[c3, a9, EOS]] = torch.tensor([0.45, 0.45, 0.1]).log()
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()[0] = 1.0
        model.output.weight.zero_()[:, 0] = logits
    out_dir = write_ckpt(tmp_path / 'out', model, data_dir)
    run('sample.py', f'--out_dir={out_dir}', '--start=Café', '--num_samples=4', '--max_new_tokens=50',
        '--temperature=1.0', '--top_k=None', '--seed=7')
    out = samples(capsys.readouterr().out)
    generator, x = torch.Generator().manual_seed(7), torch.tensor([[EOS] + load_tokenizer(data_dir).encode('Café')])
    for text in out:
        new = model.generate(x, 50, 1.0, None, 1.0, EOS, generator)[0, x.size(1):].tolist()
        assert EOS in new
        assert text == 'Café' + load_tokenizer(data_dir).decode(new[:new.index(EOS)])
    assert any('é' in text[4:] for text in out)


@pytest.mark.parametrize('args, kwargs', [
    (['--out_dir=/no/such/folder'], {}),
    (['--start=FILE:/no/such/prompt.txt'], {}),
    (['--start=' + 'Metformin is ' * 40], {}),  # longer than block_size
    (['--dtype=float8'], {}),
    ([], dict(vocab_size=100)),  # a model trained with another tokenizer
])
def test_sample_errors_are_one_line(tmp_path, data_dir, args, kwargs):
    out_dir = write_ckpt(tmp_path / 'out', random_model(data_dir, **kwargs), data_dir)
    run_error('sample.py', f'--out_dir={out_dir}', *args)


def test_sample_command_line_streams_text_and_reports_speed(tmp_path, data_dir):
    out_dir = write_export(tmp_path / 'export', random_model(data_dir), data_dir)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    ok = subprocess.run([sys.executable, 'sample.py', f'--out_dir={out_dir}', '--start=Aspirin', '--num_samples=1',
                         '--max_new_tokens=100'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith('Aspirin') and ok.stdout.endswith('\n---------------\n')
    assert 'note: max_new_tokens cut to' in ok.stderr and 'tokens/s' in ok.stderr
    bad = subprocess.run([sys.executable, 'sample.py', '--out_dir=/no/such/folder'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count('\n') == 1 and bad.stderr.startswith('error: ')


def test_chat_at_a_terminal_says_how_to_leave_and_times_generation_only(tmp_path, data_dir):
    out_dir = write_export(tmp_path / 'export', random_model(data_dir), data_dir)
    terminal, stdin = pty.openpty()  # sample.py's stdin is a terminal: it prompts, and Ctrl-D ends the input
    proc = subprocess.Popen([sys.executable, 'sample.py', f'--out_dir={out_dir}', '--chat', '--max_new_tokens=8'],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(stdin)

    def wait_for_prompt():
        seen = b''
        while not seen.endswith(b'> '):
            byte = os.read(proc.stdout.fileno(), 1)
            assert byte, f'sample.py ended early: {proc.communicate()}'
            seen += byte

    wait_for_prompt()
    os.write(terminal, b'Dose?\n')
    wait_for_prompt()  # the reply is written: sample.py waits for the user again
    time.sleep(2)      # who takes 2 s to think
    os.write(terminal, b'\x04')
    _, err = proc.communicate(timeout=120)
    os.close(terminal)
    err = err.decode()
    print(err)
    assert proc.returncode == 0 and '(type a message and Enter; Ctrl-D leaves)' in err
    assert float(re.search(r'tokens in ([0-9.]+)s of generation', err).group(1)) < 2
