"""
Held-out evaluation of a medslm model (a training out_dir or an exported folder):

    python eval.py --out_dir=out-tiny                        # test split: loss, perplexity, bits per byte
    python eval.py --out_dir=out-tiny --mcq=pubmedqa.jsonl   # multiple-choice accuracy
    python eval.py --out_dir=out-sft-tiny --tasks=data/tasks/test.jsonl   # instruction tasks (tasks.py)

The split is scored exactly: every token once, the first one given an EOS (every document follows one).
Windows of block_size tokens end at block_size, block_size + stride, ... and the end of the split; each scores
the tokens its predecessor did not reach, so a scored token sees at least block_size - stride tokens of
context. Bits per UTF-8 byte is the number that compares models across tokenizers (on PubMed abstracts
GPT-2 small scores 0.95, GPT-2 XL 0.78).

Multiple-choice questions are JSON lines {"question", "options": [...] or {"A": ..., ...}, "answer": index,
letter or option text, "context": optional}: MedQA's files as published, PubMedQA (options yes/no/maybe) and
MedMCQA (opa..opd, cop) converted to that shape. The prediction is the option whose
tokens are most likely after "<context>\nQuestion: <question>\nAnswer:"; also with the log-likelihood divided
by the option's length in characters (lm-evaluation-harness's acc_norm), which favours long options less.

Instruction tasks are chat JSON lines (tasks.py writes them from held-out documents), rendered with the chat
template (chat.py). An item with "options" and "answer" is multiple choice: each option scored as the assistant's
reply (its tokens and <|end|>): accuracy of the likeliest option, and accuracy_norm with the log-likelihood per
character (which favours long options less), beside chance and the majority-class rate. Any other item is generated greedily
and scored against the reference by its "metric": "rougeL" (ROUGE-L F1 over lower-cased words), "set_f1" (F1
of the "; "-separated terms) or "exact"; beside it, "chance": the score of another item's reference. Every
score comes with its number of items and a 95% interval (Wilson for accuracies, normal for mean scores).
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import configure
from chat import read_conversations, render, require_chat
from checkpoint import load_checkpoint, load_for_inference
from metrics import METRICS

# -----------------------------------------------------------------------------
out_dir = 'out-tiny'    # training out_dir (ckpt.pt) or exported folder (model.safetensors)
data_dir = ''           # tokenized data (meta.json + shards); '' means the folder the model was trained on
split = 'test'
stride = 0              # tokens each window advances; the rest of the window is context. 0 means block_size // 2
batch_size = 4          # windows per forward pass; their logits take batch_size * block_size * vocab * 4 bytes
mcq = ''                # JSON lines of multiple-choice questions: score these instead of the split
tasks = ''              # chat JSON lines of instruction tasks (tasks.py's test.jsonl): score these instead
max_items = 0           # tasks: at most this many items per generation task (the first ones: decoding is the slow part); 0: all
max_new_tokens = 64     # tasks: the longest generated answer
out_file = ''           # results as JSON; '' means out_dir/eval_<split>.json or out_dir/eval_<mcq name>.json
device = 'cpu'          # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'          # 'float32' | 'bfloat16' | 'float16' (autocast) | 'auto': float32 on CPU, bf16 (or fp16) on a GPU
compile = False         # torch.compile the scoring
quantize = ''           # 'int8': score the int8-weight model that sample.py --quantize=int8 runs (quantize.py)
# -----------------------------------------------------------------------------
configure(globals())

for path, key in ((mcq, 'mcq'), (tasks, 'tasks')):
    if path and not os.path.isfile(path):
        sys.exit(f'error: question file {path} not found (--{key})')
# the tokenizer only for questions and tasks: a split is scored from its token ids alone
model, tok, ctx = load_for_inference(out_dir, device, dtype, quantize, tokenizer=bool(mcq or tasks))
block_size = model.config.block_size


def trained_on():
    # the data folder named by the checkpoint, or by the training_config.json an export carries
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if os.path.exists(ckpt_path):
        return load_checkpoint(ckpt_path, mmap=True)['data_dir']
    if os.path.exists(os.path.join(out_dir, 'training_config.json')):
        with open(os.path.join(out_dir, 'training_config.json')) as f:
            return json.load(f).get('data_dir')


def nll(x, y):
    """Summed negative log-likelihood of each row's targets y (-1 = not scored), in fp32: (B,)"""
    scored = y != -1
    # the head runs only where a target is scored: at the default stride that halves its cost, and the head is
    # most of a small model's forward pass when the vocabulary is large
    logits = model.output(model.hidden(x)[scored]).float()  # (scored, vocab)
    losses = F.cross_entropy(logits, y[scored], reduction='none')
    return torch.zeros(len(x), device=x.device).index_add_(0, scored.nonzero()[:, 0], losses)


if compile:
    nll = torch.compile(nll, dynamic=True)


def read_mcq(path):
    """(prompt, option texts, answer index) for each question of a JSON lines file."""
    questions = []
    for n, line in enumerate(open(path, encoding='utf-8'), 1):
        if not line.strip():
            continue
        q = json.loads(line)
        if not ({'question', 'options', 'answer'} <= q.keys() and len(q['options']) >= 2):
            sys.exit(f'error: {path}:{n}: a question needs the keys question, options (two or more) and answer')
        options, answer = q['options'], q['answer']
        keys = list(options) if isinstance(options, dict) else [chr(ord('A') + i) for i in range(len(options))]
        texts = list(options.values()) if isinstance(options, dict) else list(options)
        if type(answer) is int and 0 <= answer < len(texts):
            index = answer
        elif answer in keys:
            index = keys.index(answer)
        elif answer in texts:
            index = texts.index(answer)
        else:
            sys.exit(f'error: {path}:{n}: answer {answer!r} is neither an option index, letter nor text')
        context = q.get('context') or ''
        context = '\n'.join(context) if isinstance(context, list) else context
        questions.append(((context + '\n' if context else '') + f"Question: {q['question']}\nAnswer:", texts, index))
    return questions


def option_logprobs(context, conts):
    """Log-likelihood of each continuation (token ids) after the context (token ids), all in one batch."""
    if max(map(len, conts)) >= block_size:
        sys.exit(f'error: an option of {max(map(len, conts))} tokens does not fit block_size {block_size}')
    seqs = [(context + c)[-(block_size + 1):] for c in conts]  # a long prompt loses its start, never the option
    T = max(map(len, seqs)) - 1
    x = torch.full((len(seqs), T), tok.eos_id, dtype=torch.long)  # right padding: causal, so never attended
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (s, c) in enumerate(zip(seqs, conts)):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(s) - 1 - len(c):len(s) - 1] = torch.tensor(c, dtype=torch.long)
    return (-nll(x.to(device), y.to(device))).tolist()


def interval(scores, binary):
    """95% interval of a mean: Wilson's for a proportion, the normal approximation otherwise."""
    n, mean, z = len(scores), float(np.mean(scores)), 1.96
    if binary:
        centre, half = (mean + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)
    half = z * float(np.std(scores, ddof=1)) / math.sqrt(n) if n > 1 else float('inf')
    return max(0.0, mean - half), min(1.0, mean + half)  # every metric here lies in [0, 1]


def generate_answer(prompt):
    """The model's greedy reply (text) to a rendered prompt, stopped at <|end|> or max_new_tokens."""
    n_new = min(max_new_tokens, max(block_size - len(prompt), block_size // 4))
    prompt = prompt[-(block_size - n_new + 1):]  # a prompt too long for a reply loses its start
    new = []
    for token in model.stream(torch.tensor([prompt], device=device), n_new, temperature=0, eos_id=tok.chat['end']):
        if token.item() == tok.chat['end']:
            break
        new.append(token.item())
    return tok.decode(new)


def score_tasks(path):
    """Per-task results of the items in path (see the docstring at the top), and every item's record."""
    records, _ = read_conversations(path)
    by_task = {}
    for r in records:
        items = by_task.setdefault(r.get('task', 'chat'), [])
        if not max_items or len(items) < max_items or 'options' in r:
            items.append(r)
    summary, results = {}, []
    for task, items in by_task.items():
        scores, scores_norm, answers = [], [], []
        multiple_choice = all('options' in r and 'answer' in r for r in items)
        metric = METRICS.get(items[0].get('metric', 'rougeL'))
        if metric is None:
            sys.exit(f"error: {path}: task {task} has metric {items[0]['metric']!r}; expected one of {', '.join(METRICS)}")
        for r in tqdm(items, desc=task, disable=None):
            prompt, _ = render(r['messages'][:-1], tok, add_generation_prompt=True)
            if multiple_choice:
                conts = [tok.encode(o) + [tok.chat['end']] for o in r['options']]
                logprobs = option_logprobs(prompt, conts)
                pred = int(np.argmax(logprobs))
                pred_norm = int(np.argmax([lp / (len(o) + 1) for lp, o in zip(logprobs, r['options'])]))
                scores.append(float(pred == r['answer']))
                scores_norm.append(float(pred_norm == r['answer']))
                answers.append(r['options'][r['answer']])
                results.append(dict(task=task, doc_id=r.get('doc_id'), answer=r['answer'], pred=pred,
                                    pred_norm=pred_norm, scores=logprobs))
            else:
                reference, prediction = r['messages'][-1]['content'], generate_answer(prompt)
                scores.append(metric(prediction, reference))
                answers.append(reference)
                results.append(dict(task=task, doc_id=r.get('doc_id'), prediction=prediction, score=scores[-1]))
        low, high = interval(scores, multiple_choice)
        if multiple_choice:  # chance: a uniform guess; majority: always the commonest answer
            chance = float(np.mean([1 / len(r['options']) for r in items]))
            majority = max(answers.count(a) for a in set(answers)) / len(answers)
        else:  # chance: another item's reference as the answer
            chance = float(np.mean([metric(answers[(i + 1) % len(answers)], a) for i, a in enumerate(answers)]))
            majority = None
        summary[task] = dict(items=len(items), metric='accuracy' if multiple_choice else items[0].get('metric', 'rougeL'),
                             score=float(np.mean(scores)), low=low, high=high, chance=chance, majority=majority)
        if multiple_choice:
            summary[task].update(zip(('score_norm', 'low_norm', 'high_norm'),
                                     (float(np.mean(scores_norm)), *interval(scores_norm, True))))
    return summary, results


def score_mcq(path):
    """(summary, results) of the multiple-choice questions in path."""
    questions, results = read_mcq(path), []
    for prompt, options, answer in tqdm(questions, desc='questions', disable=None):
        scores = option_logprobs([tok.eos_id] + tok.encode(prompt), [tok.encode(' ' + o) for o in options])
        scores_norm = [s / (len(o) + 1) for s, o in zip(scores, options)]  # per character of ' ' + option
        results.append(dict(answer=answer, pred=int(np.argmax(scores)), pred_norm=int(np.argmax(scores_norm)),
                            scores=scores, scores_norm=scores_norm))
    summary = dict(questions=len(results),
                   accuracy=float(np.mean([r['pred'] == r['answer'] for r in results])),
                   accuracy_norm=float(np.mean([r['pred_norm'] == r['answer'] for r in results])),
                   chance=float(np.mean([1 / len(q[1]) for q in questions])))
    return summary, results


def read_split(folder):
    """(tokens of the split, its meta.json entry), checked against the model's vocabulary."""
    if not folder or not os.path.exists(os.path.join(folder, 'meta.json')):
        sys.exit(f'error: no meta.json in data folder {folder!r} (--data_dir)')
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    if split not in meta['splits']:
        sys.exit(f"error: {folder} has no split {split!r}, only {', '.join(meta['splits'])} (--split)")
    info = meta['splits'][split]
    tokens = np.concatenate([np.fromfile(os.path.join(folder, f), dtype=meta['dtype']) for f in info['files']])
    if tokens.max() >= model.config.vocab_size:
        sys.exit(f'error: {folder} holds token {tokens.max()}, past the model\'s vocab_size {model.config.vocab_size}')
    return np.concatenate([[meta['eos_id']], tokens]).astype(np.int64), info


def score_split(data, step):
    """(summed NLL, windows) of every target data[1:] given what precedes it, in windows of block_size."""
    n, L = len(data) - 1, min(block_size, len(data) - 1)
    windows, end, done = [], L, 0  # (first input, first scored target, end)
    while True:
        windows.append((end - L, done, end))
        if end == n:
            break
        done, end = end, min(end + step, n)
    total, data = 0.0, torch.from_numpy(data)
    for i in tqdm(range(0, len(windows), batch_size), desc=f'{split} windows', disable=None):
        batch = windows[i:i + batch_size]
        x = torch.stack([data[a:e] for a, _, e in batch])
        y = torch.stack([data[a + 1:e + 1] for a, _, e in batch])
        for row, (a, d, _) in enumerate(batch):
            y[row, :d - a] = -1  # scored by an earlier window
        total += nll(x.to(device), y.to(device)).double().sum().item()
    return total, windows


with torch.no_grad(), ctx:
    if tasks:
        require_chat(tok, model.config.vocab_size)
        summary, results = score_tasks(tasks)
        header = f'{tasks}: {sum(t["items"] for t in summary.values())} items'
        report = dict(out_dir=out_dir, tasks=tasks, summary=summary, results=results)
        default_out = 'eval_tasks.json'
    elif mcq:
        summary, results = score_mcq(mcq)
        header = f'{mcq}: {len(results)} questions'
        report = dict(out_dir=out_dir, mcq=mcq, **summary, results=results)
        default_out = f'eval_{os.path.splitext(os.path.basename(mcq))[0]}.json'
    else:
        folder, step = data_dir or trained_on(), stride or block_size // 2
        if not 1 <= step <= block_size:
            sys.exit(f'error: stride {step} must be between 1 and block_size {block_size}')
        data, info = read_split(folder)
        total, windows = score_split(data, step)
        n, L, loss = len(data) - 1, min(block_size, len(data) - 1), total / (len(data) - 1)
        summary = dict(loss=loss, perplexity=math.exp(loss), bits_per_token=loss / math.log(2),
                       bits_per_byte=total / math.log(2) / info['bytes'])
        header = (f'{folder} {split}: {n:,} tokens, {info["bytes"]:,} bytes, '
                  f'{len(windows)} windows of {L} (stride {step})')
        report = dict(out_dir=out_dir, quantize=quantize, data_dir=folder, split=split, tokens=n, bytes=info['bytes'],
                      windows=len(windows), block_size=block_size, stride=step, **summary)
        default_out = f'eval_{split}.json'

print(header)
if tasks:
    print('| task | items | metric | score [95% interval] | per-character norm | chance | majority |\n'
          '|---|---|---|---|---|---|---|')
    for task, t in summary.items():
        norm = f"{t['score_norm']:.3f} [{t['low_norm']:.3f}, {t['high_norm']:.3f}]" if 'score_norm' in t else ''
        majority = f"{t['majority']:.3f}" if t['majority'] is not None else ''
        print(f"| {task} | {t['items']} | {t['metric']} | {t['score']:.3f} [{t['low']:.3f}, {t['high']:.3f}] "
              f"| {norm} | {t['chance']:.3f} | {majority} |")
else:
    for key, value in summary.items():
        print(f'  {key:<16} {value:>10.4f}' if isinstance(value, float) else f'  {key:<16} {value:>10}')
out_file = out_file or os.path.join(out_dir, default_out)
with open(out_file, 'w') as f:
    json.dump(report, f, indent=2)
print(f'wrote {out_file}')
