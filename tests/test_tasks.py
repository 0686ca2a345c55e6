"""tasks.py on synthetic PubMed files: items keep prepare.py's split and record semantics, multiple-choice items
are well formed, sections and publication types map as documented, output is deterministic, a kill at any moment
leaves the old output or the new one, bad input is a one-line error. pytest tests/test_tasks.py"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import records
import tasks
from helpers import ROOT


def test_every_item_comes_from_a_document_prepare_put_in_the_same_split(corpus):
    meta = json.load(open(os.path.join(corpus['data'], 'meta.json')))
    split_docs = {s: meta['splits'][s]['docs'] for s in ('train', 'val', 'test')}
    for split, items in corpus['items'].items():
        assert items, split
        for i in items:
            assert records.split_of(i['doc_id'], 0.2, 0.2) == split
    held_out = {i['doc_id'] for s in ('val', 'test') for i in corpus['items'][s]}
    assert not held_out & {i['doc_id'] for i in corpus['items']['train']}
    documents = {s: len({i['doc_id'] for i in corpus['items'][s] if i['task'] == 'title'}) for s in split_docs}
    assert documents == split_docs  # every kept document, and only those, has its title item


def test_a_later_version_replaces_the_record_and_a_deletion_leaves_no_items(corpus):
    items = [i for s in corpus['items'].values() for i in s]
    assert not [i for i in items if i['doc_id'] == 'pmid:1001']
    titles = [i['messages'][1]['content'] for i in items if i['doc_id'] == 'pmid:1000' and i['task'] == 'title']
    assert titles == ['Replaced title of the first study']


def test_multiple_choice_items_are_well_formed_with_distractors_from_the_same_split(corpus):
    for split, items in corpus['items'].items():
        titles = {i['messages'][1]['content'] for i in items if i['task'] == 'title'}
        for i in items:
            if 'options' in i:
                assert i['messages'][1]['content'] == i['options'][i['answer']]
                assert len(set(i['options'])) == len(i['options']) == 4
            if i['task'] == 'title_choice':
                assert set(i['options']) <= titles  # distractors are titles of this split's documents
            else:
                assert 'metric' in i or 'options' in i


def test_sections_map_from_nlm_category_and_publication_types_by_precedence(corpus):
    items = [i for s in corpus['items'].values() for i in s]
    sections = {i['messages'][1]['content'] for i in items if i['task'] == 'sentence_section'}
    assert sections == {'background', 'methods', 'results', 'conclusions'}  # AIMS/OBJECTIVE is background
    kinds = {int(i['doc_id'][5:]) % 5: i['messages'][1]['content'] for i in items if i['task'] == 'publication_type'}
    assert kinds == {0: 'review', 1: 'case report', 2: 'clinical trial', 3: 'research article'}  # 4: an editorial
    assert tasks.publication_type(['Review', 'Case Reports']) == 'case report'
    assert tasks.publication_type(['Clinical Trial, Phase II', 'Review']) == 'clinical trial'
    mesh = {i['messages'][1]['content'] for i in items if i['task'] == 'mesh_topics'}
    assert mesh == {'Diabetes Mellitus'}  # major topics only
    held_out_sections = [i for s in ('val', 'test') for i in corpus['items'][s] if i['task'] == 'sentence_section']
    per_doc = {}
    for i in held_out_sections:
        per_doc.setdefault(i['doc_id'], []).append(i['messages'][1]['content'])
    assert all(sorted(v) == sorted(set(v)) for v in per_doc.values())  # one sentence per section per document


def test_max_chars_clips_prompts_at_sentence_boundaries_and_output_is_deterministic(corpus, tmp_path):
    out = str(tmp_path / 'short')
    tasks.main(['--data_dir', corpus['data'], '--out', out, '--max_chars', '150'])
    for line in open(os.path.join(out, 'test.jsonl')):
        i = json.loads(line)
        text = i['messages'][0]['content'].split('\n\n', 1)[1]
        assert len(text) <= 150 and (text.endswith('.') or i['task'] == 'conclusions')
    again = str(tmp_path / 'again')
    tasks.main(['--data_dir', corpus['data'], '--out', again, '--max_chars', '150'])
    for name in ('train.jsonl', 'val.jsonl', 'test.jsonl', 'counts.json'):
        a, b = open(os.path.join(out, name)).read(), open(os.path.join(again, name)).read()
        assert a == b or name == 'counts.json' and json.loads(a)['items'] == json.loads(b)['items']


def test_a_changed_input_or_a_missing_dataset_is_a_one_line_error(corpus, tmp_path):
    with pytest.raises(SystemExit) as e:
        tasks.main(['--data_dir', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'o')])
    assert 'meta.json' in str(e.value.code) and '\n' not in str(e.value.code)
    data = tmp_path / 'data'
    meta = json.load(open(os.path.join(corpus['data'], 'meta.json')))
    changed = tmp_path / 'pubmed20n0001.xml'
    changed.write_text(open(meta['inputs'][0]['path']).read().replace('Study', 'Trial'))
    meta['inputs'][0]['path'] = str(changed)
    data.mkdir()
    (data / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        tasks.main(['--data_dir', str(data), '--out', str(tmp_path / 'o')])
    message = str(e.value.code)
    print(message)
    assert str(changed) in message and 'changed' in message and not os.path.exists(tmp_path / 'o')


def test_max_train_items_caps_each_task_and_balances_answers_but_leaves_held_out_splits_whole(corpus, tmp_path):
    out = str(tmp_path / 'capped')
    tasks.main(['--data_dir', corpus['data'], '--out', out, '--max_train_items', '8'])
    items = {s: [json.loads(l) for l in open(os.path.join(out, f'{s}.jsonl'))] for s in ('train', 'val', 'test')}
    assert items['val'] == corpus['items']['val'] and items['test'] == corpus['items']['test']
    full = corpus['items']['train']
    assert all(i in full for i in items['train'])
    for task in {i['task'] for i in full}:
        kept = [i for i in items['train'] if i['task'] == task]
        assert len(kept) == min(8, len([i for i in full if i['task'] == task])), task
        if task in ('publication_type', 'sentence_section'):  # at most 8 / 4 per answer
            answers = [i['messages'][1]['content'] for i in kept]
            assert max(answers.count(a) for a in answers) <= 2 and len(set(answers)) == 4, task


def test_tasks_keeps_one_groups_items_exactly_and_refuses_an_unknown_name(corpus, tmp_path, capsys):
    group = ('title', 'conclusions', 'mesh_topics', 'keywords')  # a generation expert's data
    out = str(tmp_path / 'gen')
    tasks.main(['--data_dir', corpus['data'], '--out', out, '--tasks', ','.join(group), '--max_train_items', '8'])
    capped = str(tmp_path / 'all')
    tasks.main(['--data_dir', corpus['data'], '--out', capped, '--max_train_items', '8'])
    for split in ('train', 'val', 'test'):
        kept = [json.loads(l) for l in open(os.path.join(out, f'{split}.jsonl'))]
        everything = [json.loads(l) for l in open(os.path.join(capped, f'{split}.jsonl'))]
        assert kept == [i for i in everything if i['task'] in group] and kept, split
    with pytest.raises(SystemExit):
        tasks.main(['--data_dir', corpus['data'], '--out', str(tmp_path / 'o'), '--tasks', 'title,diagnosis'])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    print(error)
    assert 'unknown task diagnosis' in error and not os.path.exists(tmp_path / 'o')


def test_a_kill_at_any_moment_leaves_the_old_output_or_the_new_one_whole(corpus, tmp_path):
    def contents(folder):
        return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}
    old = str(tmp_path / 'old')
    tasks.main(['--data_dir', corpus['data'], '--out', old, '--max_chars', '150'])
    want_old, want_new = contents(old), contents(corpus['out'])
    out = str(tmp_path / 'out')
    shutil.copytree(old, out)
    outcomes = []
    for delay in [0.00025 * k for k in range(40)]:  # after its temporary folder appears: while it writes, or renames
        run = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tasks.py'), '--data_dir', corpus['data'], '--out', out],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        writing = tmp_path / f'.out.tmp-{run.pid}'  # files.atomic_folder's
        while not writing.exists() and run.poll() is None:
            time.sleep(0.0005)
        time.sleep(delay)
        run.kill()
        run.wait()
        got = contents(out) if os.path.isdir(out) else None  # the old tasks.py: gone between its rmtree and rename
        assert got in (want_old, want_new), f'killed {delay * 1000:.2f} ms into writing: {got and sorted(got)}'
        outcomes.append('old' if got == want_old else 'new')
        if got == want_new:
            shutil.rmtree(out)
            shutil.copytree(old, out)
    print(outcomes)
    assert 'old' in outcomes  # killed mid-write at least once
    tasks.main(['--data_dir', corpus['data'], '--out', out])
    assert contents(out) == want_new
    assert sorted(os.listdir(tmp_path)) == ['old', 'out']  # the killed runs' temporary folders removed


def test_wordings_vary_the_instructions_and_options_and_test_unseen_asks_with_the_held_out_ones(corpus, tmp_path):
    out = str(tmp_path / 'worded')
    tasks.main(['--data_dir', corpus['data'], '--out', out, '--wordings', '3'])
    read = lambda name: [json.loads(l) for l in open(os.path.join(out, name))]
    train, test, unseen = read('train.jsonl'), read('test.jsonl'), read('test_unseen.jsonl')
    for task, wordings in tasks.INSTRUCTIONS.items():
        asked = {i['messages'][0]['content'].split('\n\n', 1)[0] for i in train if i['task'] == task}
        assert len(asked) > 1 and asked <= set(wordings[:3]) and wordings[-1] not in asked, task
    plain = corpus['items']['test']  # --wordings=1: every item in the first wording, as before
    assert [i['doc_id'] for i in unseen] == [i['doc_id'] for i in plain] and len(test) == len(plain)
    for before, after in zip(plain, unseen):
        assert after['messages'][0]['content'] == (tasks.INSTRUCTIONS[before['task']][-1] + '\n\n'
                                                    + before['messages'][0]['content'].split('\n\n', 1)[1])
        if 'options' in before:  # the same answer, phrased the held-out way where the options are fixed
            assert after['answer'] == before['answer'] and after['messages'][1]['content'] == after['options'][after['answer']]
            phrase = tasks.OPTION_WORDINGS.get(before['task'], (str,))[-1]
            assert after['options'] == [phrase(o) for o in before['options']]
    assert {i['options'][i['answer']] for i in unseen if i['task'] == 'sentence_section'} == {
        'the background section', 'the methods section', 'the results section', 'the conclusions section'}
    for split in (test, unseen):  # one name per class within a file, else majority and balanced accuracy split a class
        for task in tasks.OPTION_WORDINGS:
            assert len({tuple(i['options']) for i in split if i['task'] == task}) == 1, task


def test_a_held_out_document_sharing_13_words_with_a_train_document_is_dropped():
    words = 'patients with type two diabetes were given metformin twice daily for twelve weeks in total'.split()
    train = {'pmid:1': {'title': 'A trial', 'text': ' '.join(['Background.'] + words + ['Results followed.'])}}
    held_out = {'pmid:2': {'title': 'Another', 'text': 'We report that ' + ' '.join(words[2:15]) + ' here.'},  # 13 words
                'pmid:3': {'title': 'A third', 'text': 'We report that ' + ' '.join(words[2:14]) + ' here.'},  # 12 words
                'pmid:4': {'title': ' '.join(words[:13]), 'text': 'Unrelated text.'}}  # in its title
    assert tasks.near_copies(train, held_out) == {'pmid:2', 'pmid:4'}
