"""
What an evaluation set shares with training text. prepare.py --exclude keeps an evaluation set's documents out of
a dataset; eval.py reports which items of a question or task file a model's training split holds. Both read the
sets, their ids and their n-grams here, and eval.py and tasks.py read prepare.py's document manifest here.

An evaluation file is one of: multiple-choice JSON lines ({"question", "options", "answer", "context"}: eval.py
--mcq), tasks.py's chat JSON lines ({"messages", "doc_id"}), or PubMedQA's published JSON object keyed by PMID
({"QUESTION", "CONTEXTS", "final_decision"}), read as multiple-choice items. An item names a document by its
"doc_id" (pmid:N, pmc:N, text:<hash>), its "pmid", or, in PubMedQA, its key.

N-grams are GPT-3's (Brown et al. 2020, appendix C): 13 words, lower-cased, punctuation dropped. Shorter ones
match by chance in boilerplate ("the aim of this study was to", 8 words, opens thousands of abstracts); longer
ones miss an item that quotes a single sentence of an abstract (25 words on average), and 13 makes our numbers
comparable with GPT-3's and lm-evaluation-harness's. An n-gram is a 64-bit polynomial hash of its normalised
bytes, the same in every process (Python's hash() is not): two distinct n-grams of 1M evaluation n-grams and
10 billion training ones collide with probability ~5e-4.

  items = read_items(path)                      # [(where, item)], where = "file:line" for error messages
  hashes, owner = item_ngrams(items)            # every n-gram of every item, and the item it comes from
  found = lookup(np.unique(hashes), ngram_hashes(texts)[0])   # the table position of each, -1 if absent
"""
import csv
import gzip
import json
import os
import re

import numpy as np

NGRAM = 13
NONWORD = re.compile(r'[\W_]+')  # what separates words; \W is Unicode-aware, so "naïve" and "β-blocker" keep letters
BASE = np.uint64(0x100000001B3)  # FNV-1's prime: odd, so it has an inverse modulo 2**64
INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))
BATCH_BYTES = 1 << 20  # texts are hashed in batches of about this size: 4 arrays of 8 bytes a byte, 32 MB
MANIFEST = 'manifest.tsv.gz'
MANIFEST_COLUMNS = ('id', 'input', 'license', 'license_type', 'license_url', 'split', 'shard', 'offset', 'tokens')


def ngram_hashes(texts):
    """Every NGRAM-word n-gram of each text as a uint64: (hashes, the index of the text each comes from)."""
    words = [(i, w) for i, w in enumerate(NONWORD.sub(' ', t.lower()).strip() for t in texts)
             if w.count(' ') >= NGRAM - 1]  # shorter texts have none
    out, a = [(np.zeros(0, np.uint64), np.zeros(0, np.int64))], 0
    while a < len(words):
        b, size = a, 0
        while b < len(words) and (b == a or size < BATCH_BYTES):
            size, b = size + len(words[b][1]), b + 1
        out.append(batch_hashes(words[a:b]))
        a = b
    return np.concatenate([h for h, _ in out]), np.concatenate([o for _, o in out])


def batch_hashes(batch):
    # a polynomial hash of every byte prefix, so that each n-gram's is two lookups: sum(x[j] * BASE**(j - start))
    # over its bytes = (prefix[end] - prefix[start]) * INVERSE**start, all modulo 2**64 (numpy's uint64 wraps)
    data = np.frombuffer(''.join(w + ' ' for _, w in batch).encode(), np.uint8)  # every word ends in a space
    power, inverse = np.full(len(data), BASE), np.full(len(data), INVERSE)
    power[0] = inverse[0] = 1
    prefix = np.zeros(len(data) + 1, np.uint64)
    np.cumsum(data * np.cumprod(power), out=prefix[1:])
    ends = np.flatnonzero(data == 32)  # a space is one byte and never inside a UTF-8 character
    starts = np.r_[0, ends[:-1] + 1]
    owner = np.repeat(np.array([i for i, _ in batch], np.int64), [w.count(' ') + 1 for _, w in batch])
    first = np.flatnonzero(owner[:len(owner) - NGRAM + 1] == owner[NGRAM - 1:])  # n-grams within one text
    return (prefix[ends[first + NGRAM - 1]] - prefix[starts[first]]) * np.cumprod(inverse)[starts[first]], owner[first]


def lookup(table, hashes):
    """The position of each of hashes in table (sorted, unique), -1 where it is not there."""
    if not len(table):
        return np.full(len(hashes), -1, np.int64)
    pos = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
    return np.where(table[pos] == hashes, pos, -1)


# ----------------------------------------------------------------------------- evaluation sets


def pubmedqa_item(pmid, entry):
    return dict(doc_id=f'pmid:{pmid}', question=entry['QUESTION'], context=entry.get('CONTEXTS') or [],
                options=['yes', 'no', 'maybe'], answer=entry.get('final_decision'))


def read_items(path):
    """[(where, item)] of an evaluation file (see the top); a bad file is a ValueError naming the place."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None  # JSON lines
    if isinstance(whole, dict) and whole and all(isinstance(v, dict) and 'QUESTION' in v for v in whole.values()):
        return [(f'{path}: PMID {pmid}', pubmedqa_item(pmid, v)) for pmid, v in whole.items()]
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f'{path}:{n}: not JSON ({e})')
            if not isinstance(item, dict):
                raise ValueError(f'{path}:{n}: an item is a JSON object')
            items.append((f'{path}:{n}', item))
    if not items:
        raise ValueError(f'{path}: no items')
    return items


def item_ids(item):
    """The documents an item names."""
    ids = [item['doc_id']] if isinstance(item.get('doc_id'), str) else []
    return ids + [f'pmid:{item[k]}' for k in ('pmid', 'PMID') if str(item.get(k, '')).strip().isdigit()]


def item_texts(item):
    """The texts of an item, each checked for n-grams on its own: question, context, options, messages."""
    texts = [item.get(k) for k in ('question', 'context', 'prompt', 'response', 'chosen', 'rejected')]
    texts += list(item['options'].values() if isinstance(item.get('options'), dict) else item.get('options') or [])
    texts += [m.get('content') for m in item.get('messages') or [] if isinstance(m, dict)]
    texts += item['context'] if isinstance(item.get('context'), list) else []
    return [t for t in texts if isinstance(t, str)]


def item_ngrams(items):
    """(every n-gram hash of the items' texts, the index of the item it comes from) of [(where, item)]."""
    owners, texts = [], []
    for i, (_, item) in enumerate(items):
        mine = item_texts(item)
        texts += mine
        owners += [i] * len(mine)
    hashes, text_of = ngram_hashes(texts)
    return hashes, np.array(owners, np.int64)[text_of] if len(text_of) else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- the manifest (prepare.py writes it)


def manifest_rows(folder):
    """The rows of folder's document manifest as dicts of MANIFEST_COLUMNS (strings), streamed."""
    with gzip.open(os.path.join(folder, MANIFEST), 'rt', encoding='utf-8', newline='') as f:
        yield from csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE)


def has_manifest(folder):
    return bool(folder) and os.path.isfile(os.path.join(folder, MANIFEST))
