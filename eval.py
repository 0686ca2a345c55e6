"""
Held-out evaluation of a medslm model (a training out_dir or an exported folder):

    python eval.py --out_dir=out-tiny                        # test split: loss, perplexity, bits per byte
    python eval.py --out_dir=out-tiny --mcq=pubmedqa.jsonl   # multiple-choice accuracy
    python eval.py --out_dir=out-tiny --mcq=ori_pqal.json    # PubMedQA's file as published
    python eval.py --out_dir=out-sft-tiny --tasks=data/tasks/test.jsonl   # instruction tasks (tasks.py)

The split is scored exactly: every token once, the first one given an EOS (every document follows one).
Windows of block_size tokens end at block_size, block_size + stride, ... and the end of the split; each scores
the tokens its predecessor did not reach, so a scored token sees at least block_size - stride tokens of
context. Bits per UTF-8 byte is the number that compares models across tokenizers (on PubMed abstracts
GPT-2 small scores 0.95, GPT-2 XL 0.78).

Multiple-choice questions are JSON lines {"question", "options": [...] or {"A": ..., ...}, "answer": index,
letter or option text, "context": optional}: MedQA's files as published, MedMCQA (opa..opd, cop) converted to
that shape; PubMedQA's published JSON (keyed by PMID: QUESTION, CONTEXTS, final_decision) is read as it is, as
options yes/no/maybe (contamination.read_items). The prediction is the option whose
tokens are most likely after "<context>\nQuestion: <question>\nAnswer:"; also with the log-likelihood divided
by the option's length in characters (lm-evaluation-harness's acc_norm), which favours long options less.

Instruction tasks are chat JSON lines (tasks.py writes them from held-out documents), rendered with the chat
template (chat.py). An item with "options" and "answer" is multiple choice: each option scored as the assistant's
reply (its tokens and <|end|>): accuracy of the likeliest option; accuracy_norm with the log-likelihood per
character (which favours long options less); calibrated, with each option's log-likelihood less its log-likelihood
after the instruction alone (what the document adds: a model that ignores it scores chance, whatever it thinks of
the options' wordings); beside chance and the majority-class rate, and where every item has the same options
(publication type, sentence section) balanced accuracy, the mean recall per class, which always answering the
commonest class cannot raise. Any other item is generated greedily and scored against the reference
by its "metric": "rougeL" (ROUGE-L F1 over lower-cased words), "set_f1" (F1 of the "; "-separated terms) or
"exact"; beside it, "chance": the score of another item's reference. Every score comes with its number of items and
a 95% interval (Wilson for accuracies, normal for mean scores and balanced accuracy).

Contamination: questions and tasks are checked against the train split the model read (prepare.py's manifest and
shards of its data folder, or of the one the model it was fine-tuned from read). An item is contaminated if it
names a document of that split (doc_id, pmid) or shares a 13-word n-gram with one (contamination.py); each score
is given again on the clean items, so an inflated number shows.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from card import refresh_card, span
from configurator import configure
from chat import read_conversations, render, require_chat
from checkpoint import load_checkpoint, load_for_inference
from files import write_text
from contamination import NGRAM, has_manifest, item_ids, item_ngrams, lookup, manifest_rows, ngram_hashes, read_items
from metrics import METRICS
from tokenizer import load_tokenizer

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
train_data = ''         # mcq, tasks: the data folder whose train split items are checked against; '' means the one the
                        # model (or the model it was fine-tuned from) was trained on; 'none': no check
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


def training_config(path):
    # the training settings and data folder of the model at path: its checkpoint's, or its export's copy of them
    ckpt_path = os.path.join(path, 'ckpt.pt')
    if os.path.exists(ckpt_path):
        checkpoint = load_checkpoint(ckpt_path, mmap=True)
        return dict(checkpoint.get('config') or {}, data_dir=checkpoint['data_dir'])
    if os.path.exists(os.path.join(path, 'training_config.json')):
        with open(os.path.join(path, 'training_config.json')) as f:
            training = json.load(f)
        return dict(training.get('config') or {}, data_dir=training.get('data_dir'))
    return {}


def trained_on():
    return training_config(out_dir).get('data_dir')


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


def read_mcq(items):
    """(prompt, option texts, answer index) for each question of [(where, item)] (contamination.read_items)."""
    questions = []
    for where, q in items:
        if not ({'question', 'options', 'answer'} <= q.keys() and len(q['options']) >= 2):
            sys.exit(f'error: {where}: a question needs the keys question, options (two or more) and answer')
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
            sys.exit(f'error: {where}: answer {answer!r} is neither an option index, letter nor text')
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


def balanced_accuracy(answers, preds):
    """The mean of the recalls of the classes present, and its 95% interval: normal, from each class's binomial
    variance taken Agresti-Coull's way (two hits and two misses added) so that a recall of 0 or 1 is not certainty.
    A model that always answers the commonest class scores 1 / classes, however skewed they are."""
    hits = {a: (sum(p == a for x, p in zip(answers, preds) if x == a), answers.count(a)) for a in set(answers)}
    mean = float(np.mean([k / n for k, n in hits.values()]))
    variance = sum((k + 2) * (n - k + 2) / (n + 4) ** 3 for k, n in hits.values()) / len(hits) ** 2
    half = 1.96 * math.sqrt(variance)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


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


def choose(messages, options):
    """One multiple-choice item's predictions: the likeliest option (pred), the likeliest per character (pred_norm),
    and calibrated (pred_cal): each option's log-likelihood less its log-likelihood after the same instruction with
    the document taken out (the user turn's first paragraph only), i.e. what the document adds to the option, not
    how likely its words are anyway (Holtzman et al. 2021's domain-conditional PMI). A model that ignores the
    document scores chance calibrated, whatever its prior over the options' wordings."""
    conts = [tok.encode(o) + [tok.chat['end']] for o in options]
    logprobs = option_logprobs(render(messages, tok, add_generation_prompt=True)[0], conts)
    ask = messages[-1]['content'].split('\n\n')[0] if '\n\n' in messages[-1]['content'] else ''
    prior = option_logprobs(render(messages[:-1] + [dict(messages[-1], content=ask)], tok,
                                   add_generation_prompt=True)[0], conts)
    return dict(pred=int(np.argmax(logprobs)),
                pred_norm=int(np.argmax([lp / (len(o) + 1) for lp, o in zip(logprobs, options)])),
                pred_cal=int(np.argmax([a - b for a, b in zip(logprobs, prior)])), scores=logprobs, prior=prior)


KINDS = {'pred': '', 'pred_norm': '_norm', 'pred_cal': '_cal'}  # a prediction and the suffix of its summary keys


def summarize_choices(items, results):
    """Accuracy of each kind of prediction with its interval, and balanced accuracy where the classes are fixed."""
    summary, answers = {}, [r['options'][r['answer']] for r in items]
    fixed = len({frozenset(r['options']) for r in items}) == 1  # fixed classes: skew shows in balanced accuracy
    for kind, suffix in KINDS.items():
        hits = [float(x[kind] == x['answer']) for x in results]
        summary.update(zip(('score' + suffix, 'low' + suffix, 'high' + suffix), (float(np.mean(hits)),
                                                                                   *interval(hits, True))))
        if fixed:
            preds = [r['options'][x[kind]] for r, x in zip(items, results)]
            summary.update(zip([f'balanced{suffix}', f'low_balanced{suffix}', f'high_balanced{suffix}'],
                               balanced_accuracy(answers, preds)))
    return summary


def score_tasks(records, flags):
    """Per-task results of the items (see the docstring at the top), and every item's record. flags: each item's
    contamination (contamination_check), None if not checked."""
    by_task = {}
    for r, flag in zip(records, flags or [None] * len(records)):
        items = by_task.setdefault(r.get('task', 'chat'), [])
        if not max_items or len(items) < max_items or 'options' in r:
            items.append(dict(r, contaminated=flag))
    summary, results = {}, []
    for task, items in by_task.items():
        multiple_choice = all('options' in r and 'answer' in r for r in items)
        metric = METRICS.get(items[0].get('metric', 'rougeL'))
        if metric is None:
            sys.exit(f"error: {tasks}: task {task} has metric {items[0]['metric']!r}; expected one of {', '.join(METRICS)}")
        mine = []
        for r in tqdm(items, desc=task, disable=None):
            if multiple_choice:
                mine.append(dict(task=task, doc_id=r.get('doc_id'), answer=r['answer'],
                                 **choose(r['messages'][:-1], r['options']), contaminated=r['contaminated']))
            else:
                prompt, _ = render(r['messages'][:-1], tok, add_generation_prompt=True)
                prediction = generate_answer(prompt)
                score = metric(prediction, r['messages'][-1]['content'])
                mine.append(dict(task=task, doc_id=r.get('doc_id'), prediction=prediction, score=score,
                                 contaminated=r['contaminated']))
        results += mine
        scores = [float(x['pred'] == x['answer']) if multiple_choice else x['score'] for x in mine]
        answers = [r['options'][r['answer']] if multiple_choice else r['messages'][-1]['content'] for r in items]
        if multiple_choice:  # chance: a uniform guess; majority: always the commonest answer
            chance = float(np.mean([1 / len(r['options']) for r in items]))
            majority = max(answers.count(a) for a in set(answers)) / len(answers)
        else:  # chance: another item's reference as the answer
            chance = float(np.mean([metric(answers[(i + 1) % len(answers)], a) for i, a in enumerate(answers)]))
            majority = None
        summary[task] = dict(items=len(items), metric='accuracy' if multiple_choice else items[0].get('metric', 'rougeL'),
                             chance=chance, majority=majority)
        summary[task].update(summarize_choices(items, mine) if multiple_choice else
                             dict(zip(('score', 'low', 'high'), (float(np.mean(scores)), *interval(scores, False)))))
        if flags:
            clean = [x for x, r in zip(scores, items) if not r['contaminated']]
            summary[task].update(contaminated=len(items) - len(clean),
                                 score_clean=float(np.mean(clean)) if clean else None)
    return summary, results


def score_mcq(questions, flags):
    """(summary, results) of the multiple-choice questions (read_mcq); flags: as score_tasks'."""
    results = []
    for (prompt, options, answer), flag in tqdm(list(zip(questions, flags or [None] * len(questions))),
                                                desc='questions', disable=None):
        scores = option_logprobs([tok.eos_id] + tok.encode(prompt), [tok.encode(' ' + o) for o in options])
        scores_norm = [s / (len(o) + 1) for s, o in zip(scores, options)]  # per character of ' ' + option
        results.append(dict(answer=answer, pred=int(np.argmax(scores)), pred_norm=int(np.argmax(scores_norm)),
                            scores=scores, scores_norm=scores_norm, contaminated=flag))
    accuracy = lambda rs, key: float(np.mean([r[key] == r['answer'] for r in rs])) if rs else None
    summary = dict(questions=len(results), accuracy=accuracy(results, 'pred'),
                   accuracy_norm=accuracy(results, 'pred_norm'),
                   chance=float(np.mean([1 / len(q[1]) for q in questions])))
    if flags:
        clean = [r for r in results if not r['contaminated']]
        summary.update(contaminated=len(results) - len(clean), accuracy_clean=accuracy(clean, 'pred'),
                       accuracy_norm_clean=accuracy(clean, 'pred_norm'))
    return summary, results


def read_evaluation(path):
    try:
        return read_items(path)
    except ValueError as e:  # a bad line, not UTF-8, no items
        sys.exit(f'error: {e}')


def pretraining_data():
    """The data folder, with prepare.py's manifest, whose train split the model read: --train_data, else the one it
    was trained on, else that of the model it was fine-tuned from (init_from), and so on; None where none has one."""
    if train_data:
        if not has_manifest(train_data):
            sys.exit(f'error: {train_data} (--train_data) has no document manifest: prepare it with this prepare.py')
        return train_data
    path = out_dir
    for _ in range(16):  # a fine-tuning of a fine-tuning ...
        config = training_config(path)
        if has_manifest(config.get('data_dir')):
            return config['data_dir']
        path = config.get('init_from')
        if path in (None, 'scratch', 'resume'):
            return None


def split_texts(folder, split, batch_tokens=1 << 22):
    """The documents of folder's split as text, in batches: its shards read a slice at a time, cut at EOS, decoded."""
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    decode, dtype, rest = load_tokenizer(folder).decode, np.dtype(meta['dtype']), np.zeros(0, meta['dtype'])
    for name in meta['splits'][split]['files']:
        path = os.path.join(folder, name)
        for a in range(0, os.path.getsize(path) // dtype.itemsize, batch_tokens):
            part = np.concatenate([rest, np.fromfile(path, dtype, batch_tokens, offset=a * dtype.itemsize)])
            cuts = np.flatnonzero(part == meta['eos_id']) + 1  # a document runs on into the next slice and shard
            rest = part[cuts[-1] if len(cuts) else 0:]
            if len(cuts):
                yield [decode(d[:-1].tolist()) for d in np.split(part[:cuts[-1]], cuts[:-1])]


def contamination_check(items):
    """Per item (where, item), whether the train split the model read holds it: by id (it names a document there)
    and by n-gram (it shares a 13-word n-gram with one), as {"id": bool, "ngram": bool}, or None if clean; and what
    was checked, for the report. (None, why not) where no data folder with a manifest is found."""
    folder = None if train_data == 'none' else pretraining_data()
    if folder is None:
        return None, dict(train_data=None, why='--train_data=none' if train_data == 'none' else
                          'no data folder with a manifest among the ones the model and its bases were trained on')
    named = {i for _, item in items for i in item_ids(item)}
    in_train = {r['id'] for r in (manifest_rows(folder) if named else []) if r['split'] == 'train' and r['id'] in named}
    hashes, owner = item_ngrams(items)
    table, documents = np.unique(hashes), 0
    seen = np.zeros(len(table), bool)  # which of the items' n-grams the split holds
    for texts in tqdm(split_texts(folder, 'train') if len(table) else [], desc='train split n-grams', disable=None):
        found = lookup(table, ngram_hashes(texts)[0])
        seen[found[found >= 0]] = True
        documents += len(texts)
    shared = np.zeros(len(items), bool)
    shared[owner[seen[np.searchsorted(table, hashes)]]] = True
    flags = [dict(id=bool(in_train.intersection(item_ids(item))), ngram=bool(shared[i]))
             for i, (_, item) in enumerate(items)]
    return [f if f['id'] or f['ngram'] else None for f in flags], dict(
        train_data=folder, ngram=NGRAM, items=len(items), contaminated=sum(f['id'] or f['ngram'] for f in flags),
        by_id=sum(f['id'] for f in flags), by_ngram=sum(f['ngram'] for f in flags), train_documents=documents)


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
        records = read_conversations(tasks)[0]
        flags, checked = contamination_check([(tasks, r) for r in records])
        summary, results = score_tasks(records, flags)
        header = f'{tasks}: {sum(t["items"] for t in summary.values())} items'
        report = dict(out_dir=out_dir, tasks=tasks, summary=summary, contamination=checked, results=results)
        default_out = 'eval_tasks.json'
    elif mcq:
        questions = read_mcq(items := read_evaluation(mcq))
        flags, checked = contamination_check(items)
        summary, results = score_mcq(questions, flags)
        header = f'{mcq}: {len(results)} questions'
        report = dict(out_dir=out_dir, mcq=mcq, **summary, contamination=checked, results=results)
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
    checked_tasks = flags is not None
    columns = ['task', 'items', 'metric', 'score [95% interval]', 'per-character norm', 'calibrated',
               'balanced accuracy [95% interval]', 'balanced, calibrated', 'chance', 'majority'] + (
        ['contaminated', 'score on clean items'] if checked_tasks else [])
    print('| ' + ' | '.join(columns) + ' |\n' + '|---' * len(columns) + '|')
    for task, t in summary.items():
        row = [task, t['items'], t['metric'], span(t, 'score', 'low', 'high'),
               span(t, 'score_norm', 'low_norm', 'high_norm'), span(t, 'score_cal', 'low_cal', 'high_cal'),
               span(t, 'balanced', 'low_balanced', 'high_balanced'),
               span(t, 'balanced_cal', 'low_balanced_cal', 'high_balanced_cal'), f"{t['chance']:.3f}",
               '' if t['majority'] is None else f"{t['majority']:.3f}"]
        if checked_tasks:
            row += [t['contaminated'], '' if t['score_clean'] is None else f"{t['score_clean']:.3f}"]
        print('| ' + ' | '.join(map(str, row)) + ' |')
else:
    for key, value in summary.items():
        print(f'  {key:<16} {value:>10.4f}' if isinstance(value, float) else f'  {key:<16} {value:>10}')
if tasks or mcq:
    c = checked
    print(f"contamination: not checked ({c['why']})" if c['train_data'] is None else
          f"contamination: {c['contaminated']} of the file's {c['items']} items "
          f"({c['contaminated'] / max(1, c['items']):.1%}) in the train split of {c['train_data']}: {c['by_id']} name "
          f"one of its documents, {c['by_ngram']} share a {NGRAM}-word n-gram with one "
          f"({c['train_documents']:,} documents read)")
out_file = out_file or os.path.join(out_dir, default_out)
write_text(out_file, json.dumps(report, indent=2))
print(f'wrote {out_file}')
if os.path.dirname(os.path.abspath(out_file)) == os.path.abspath(out_dir) and refresh_card(out_dir):
    print(f'updated {os.path.join(out_dir, "README.md")} with these results')
