"""
Plain helpers the test files share; the shared fixtures are in the root conftest.py. The scripts at the root run
as a user runs them, as subprocesses or in this process; the data and model folders are written here in
prepare.py's and train.py's formats on tiny CPU sizes, so a test depends on the script it tests and no other.
"""
import dataclasses
import gzip
import json
import os
import runpy
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_model

import prepare
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the scripts, one folder up
TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
ENV = dict(os.environ, OMP_NUM_THREADS='1')  # microscopic models: extra threads only contend on a shared box


# ----------------------------------------------------------------------------- running the scripts


def run(script, *args):
    """Runs `python script args` in this process; the output lands in pytest's capsys."""
    with mock.patch.object(sys, 'argv', [script, *map(str, args)]):
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')


def run_error(script, *args):
    with pytest.raises(SystemExit) as e:
        run(script, *args)
    message = str(e.value.code)
    print(message)
    assert message.startswith('error: ') and '\n' not in message
    return message


def train(out_dir, data_dir, *args, nproc=1, check=True):
    launcher = [sys.executable] if nproc == 1 else [TORCHRUN, '--standalone', f'--nproc_per_node={nproc}']
    cmd = launcher + ['train.py', f'--out_dir={out_dir}', f'--data_dir={data_dir}', *args]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if 'loss' in r], [r for r in records if 'val_loss' in r]


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_close(a, b, atol, what):
    diff = (a - b).abs().max().item()
    print(f'{what}: max abs difference {diff:.3e} (largest value {a.abs().max().item():.1f})')
    assert diff <= atol, f'{what}: max abs difference {diff:.3e} > {atol:.1e}'


# ----------------------------------------------------------------------------- model and data folders


EOS = 3  # the fixture tokenizer's special tokens: [PAD] [UNK] [BOS] [EOS] = 0..3
DOCS = [
    'Metformin is the first-line treatment for type 2 diabetes mellitus in most guidelines.',
    'Patients aged ≥ 65 years received 5 µg/kg of the β-blocker twice daily for 12 weeks.',
    "Sjögren's syndrome is a chronic autoimmune disease of the exocrine glands.",
    'The naïve T cells were cultured at 37 °C; IL-2 levels rose two-fold (p < 0.001).',
    'Hypertension increases the risk of stroke, myocardial infarction and chronic kidney disease.',
    'In this randomized controlled trial, 412 patients with heart failure were assigned to treatment.',
    'Insulin resistance precedes type 2 diabetes by years; metformin lowers hepatic glucose output.',
    'Aspirin irreversibly inhibits cyclooxygenase, reducing thromboxane A2 synthesis in platelets.',
    'Chronic obstructive pulmonary disease is treated with bronchodilators and inhaled corticosteroids.',
    '糖尿病 (diabetes) prevalence in adults was 11.2% — higher in men than in women.',
]
BASE = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=64, multiple_of=16)


def write_data(folder, tokenizer, meta_extra=None, splits=None):
    """prepare.py's layout for a trained BPE (None: GPT-2's, given in meta_extra): meta.json, the tokenizer, and
    a .bin of token ids per split, each document closed by EOS."""
    os.makedirs(folder, exist_ok=True)
    meta = dict(tokenizer='bpe', vocab_size=tokenizer.get_vocab_size() if tokenizer else 50257, dtype='uint16',
                eos_id=EOS, bos_id=2, pad_id=0, unk_id=1, tokenizer_file='tokenizer.json', splits={})
    meta.update(meta_extra or {})
    if tokenizer:
        tokenizer.save(os.path.join(folder, 'tokenizer.json'))
    for name, docs in (splits or {}).items():
        tokens = [t for doc in docs for t in tokenizer.encode(doc).ids + [EOS]]
        np.array(tokens, dtype=np.uint16).tofile(os.path.join(folder, f'{name}.bin'))
        meta['splits'][name] = dict(docs=len(docs), tokens=len(tokens), bytes=sum(len(d.encode()) for d in docs),
                                    files=[f'{name}.bin'])
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return folder


def random_model(data_dir, seed=0, **kwargs):
    """A tiny GPT with weights larger than the init's, so logits are far from uniform and differences show."""
    with open(os.path.join(data_dir, 'meta.json')) as f:
        vocab_size = json.load(f)['vocab_size']
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**BASE, 'vocab_size': vocab_size, **kwargs}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1 if p.dim() == 1 else 0.3)
            if 'norm' in name and name.endswith('weight'):
                p.add_(1.0)
    return model.eval()


def write_export(folder, model, data_dir):
    """out_dir/export as train.py writes it: safetensors, model args, and the data folder's tokenizer."""
    os.makedirs(folder)
    save_model(model, os.path.join(folder, 'model.safetensors'))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(dataclasses.asdict(model.config), f)
    for name in ('meta.json', 'tokenizer.json'):
        shutil.copy(os.path.join(data_dir, name), folder)
    return str(folder)


# ----------------------------------------------------------------------------- chat data and SFT


QUESTION = 'What is the first-line drug for type 2 diabetes?'
ANSWER = 'Metformin, unless kidney function is poor.'
SFT = ['--device=cpu', '--dtype=float32', '--compile=False', '--block_size=48', '--batch_size=4',
       '--gradient_accumulation_steps=1', '--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=2',
       '--eval_iters=2', '--log_interval=1', '--weight_decay=0.0']


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' if not isinstance(r, str) else r + '\n' for r in records)
    return path


def chat_data(folder, n=20):
    qa = [{'prompt': QUESTION, 'response': ANSWER}] * n
    write_jsonl(os.path.join(folder, 'train.jsonl'), qa)
    write_jsonl(os.path.join(folder, 'val.jsonl'), qa[:2])
    return folder


def sft(out_dir, data, *args, check=True):
    """train.py on chat (or preference) data with the tiny SFT settings."""
    return train(out_dir, data, *SFT, *args, check=check)


# ----------------------------------------------------------------------------- PubMed files and prepare.py


FAST = ['--vocab_size', '300', '--min_chars', '20', '--workers', '2']
WORDS = ('aspirin insulin tumour cohort randomised placebo patients mortality cardiac renal hepatic dose '
         'trial outcome biopsy lesion serum plasma receptor kinase mutation therapy chronic acute').split()
CATEGORIES = [('BACKGROUND', 'BACKGROUND'), ('AIMS', 'OBJECTIVE'), ('METHODS', 'METHODS'), ('FINDINGS', 'RESULTS'),
              ('CONCLUSIONS', 'CONCLUSIONS')]


def pubmed_set(*records):
    return ('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, '
            '1st January 2025//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n'
            '<PubmedArticleSet>\n' + ''.join(records) + '</PubmedArticleSet>\n')


def prose(rng, sentences=3):
    return ' '.join(' '.join(rng.choice(WORDS) for _ in range(9)).capitalize() + '.' for _ in range(sentences))


def record(pmid, rng, types=('Journal Article',), structured=True, mesh=(), keywords=(), title=None):
    """A PubmedArticle with what tasks.py reads: a structured (labelled) or plain abstract, publication types,
    MeSH headings (name, major topic Y/N) and keywords."""
    if structured:
        abstract = ''.join(f'<AbstractText Label="{label}" NlmCategory="{cat}">{prose(rng)}</AbstractText>'
                           for label, cat in CATEGORIES)
    else:
        abstract = f'<AbstractText>{prose(rng, 5)}</AbstractText>'
    heads = ''.join(f'<MeshHeading><DescriptorName MajorTopicYN="{major}">{name}</DescriptorName></MeshHeading>'
                    for name, major in mesh)
    return (f'<PubmedArticle><MedlineCitation><PMID Version="1">{pmid}</PMID><Article>'
            f'<ArticleTitle>{title or "Study " + str(pmid) + " of " + rng.choice(WORDS)}</ArticleTitle>'
            f'<Abstract>{abstract}</Abstract><PublicationTypeList>'
            + ''.join(f'<PublicationType>{t}</PublicationType>' for t in types) +
            '</PublicationTypeList></Article>'
            + (f'<MeshHeadingList>{heads}</MeshHeadingList>' if mesh else '')
            + (f'<KeywordList>{"".join(f"<Keyword>{k}</Keyword>" for k in keywords)}</KeywordList>' if keywords else '')
            + '</MedlineCitation></PubmedArticle>\n')


def write(path, text, gz=False):
    data = text.encode() if isinstance(text, str) else text
    with (gzip.open if gz else open)(path, 'wb') as f:
        f.write(data)
    return str(path)


def prep(*args):
    return prepare.main([str(a) for a in args])


def read_docs(out):
    """Every split's documents, decoded back from the shards by cutting at EOS."""
    with open(os.path.join(out, 'meta.json')) as f:
        meta = json.load(f)
    tok = load_tokenizer(out)
    docs = {}
    for split, s in meta['splits'].items():
        ids = np.concatenate([np.fromfile(os.path.join(out, f), dtype=meta['dtype']) for f in s['files']])
        assert len(ids) == s['tokens'] and (len(ids) == 0 or ids[-1] == tok.eos_id)
        cuts = np.flatnonzero(ids == tok.eos_id)
        docs[split] = [tok.decode(ids[a:b].tolist()) for a, b in zip(np.r_[0, cuts[:-1] + 1], cuts)]
    return meta, docs
