"""
Instruction tasks with checkable answers, built offline from the PubMed records prepare.py reads (MediPhi's idea:
instructions synthesized from medical documents, no hand labelling):

  python tasks.py --data_dir=data/pubmed_4k --out=data/tasks                  # the inputs data_dir was prepared from
  python tasks.py --data_dir=data/pubmed_4k --out=data/tasks --max_chars=600  # short enough for a 256-token model
  python tasks.py --data_dir=data/pubmed_4k --out=data/pairs --max_chars=600 --pairs  # DPO preference pairs
  python tasks.py --data_dir=data/pubmed_4k --out=data/tasks_small --max_chars=600 --max_train_items=8000  # the demo's
  python tasks.py --data_dir=data/pubmed_4k --out=data/expert_gen --max_chars=600 --max_train_items=8000 \
      --tasks=title,conclusions,mesh_topics,keywords                            # one expert's task group

task               kind             from
title              generation       the abstract -> its title (ROUGE-L)
title_choice       multiple choice  the abstract -> its title among 3 of other documents of the same split
publication_type   multiple choice  PublicationType: case report > clinical trial (any, randomized too) > review
                                    (incl. systematic, meta-analysis) > research article (Journal Article); others skipped
sentence_section   multiple choice  a sentence of a structured abstract -> background (BACKGROUND, OBJECTIVE), methods,
                                    results or conclusions, from NlmCategory; one sentence per section per document
conclusions        generation       a structured abstract without its conclusions -> them (ROUGE-L; PubMedQA's shape)
mesh_topics        generation       title and abstract -> the MeSH major topics (F1 of the "; "-separated set)
keywords           generation       title and abstract -> the author keywords (likewise)

Every item's document is in the split prepare.py gave it: the documents are read through records.py, the same
parsers and the same record rule (later versions, deletions, drops) as prepare.py's, with its settings read from
data_dir/meta.json, and the same hash split; so a test item's abstract was seen by neither pre-training nor SFT,
and a val or test document that shares a 13-word n-gram with a train document (a copy, a companion paper, a stock
sentence: eval.py's contamination check) yields no items. Output in --out, replaced whole (a kill leaves the old
folder or the new one): train.jsonl, val.jsonl, test.jsonl (chat lines, see chat.py: {"task", "doc_id",
"messages", and "options" + "answer" for multiple choice or "metric" for generation}), test_unseen.jsonl (the test
items asked in a wording, and with options phrased, as no split's item is: does a model follow an instruction it
has not seen?) and counts.json; the count table is printed. --wordings=3 draws each item's instruction and option
phrasing from three (default 1: one fixed template); test.jsonl keeps the first option phrasing, so a task's classes
keep one name each. PMC articles and plain-text inputs give no items (they have none of
these fields), but take part in the record rule as they do in prepare.py.

--pairs writes preference pairs for DPO instead: {"task", "doc_id", "prompt", "chosen": the item's answer,
"rejected": for a multiple-choice task one of its wrong options, for a generation task the answer of another
document of the same split to the same task, drawn with a seeded generator}. No labelling and no model sampling:
cheap, deterministic, and the rejected replies are fluent text of the right kind, wrong only for this document.
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys
import zlib
from collections import Counter

import numpy as np
from tqdm import tqdm

from contamination import lookup, manifest_rows, ngram_hashes
from files import atomic_folder
from records import (BAD_FILE, NO_LABEL, embedded_corpus, filter_documents, input_files, record_row, record_table,
                     records_of, split_of, squash, text_of)

GENERATION = ('title', 'conclusions', 'mesh_topics', 'keywords')  # the tasks with a free-text answer
SECTIONS = {'BACKGROUND': 'background', 'OBJECTIVE': 'background', 'METHODS': 'methods', 'RESULTS': 'results',
            'CONCLUSIONS': 'conclusions'}
PUBLICATION_TYPES = ['case report', 'clinical trial', 'review', 'research article']
# Several wordings of each instruction, as people ask (MediFlow's instructions vary): --wordings=N draws each item's
# from the first N; the last is never trained on, and test_unseen.jsonl asks every test item with it.
INSTRUCTIONS = {
    'title': ('Write a title for this abstract.', 'Suggest a title for the following abstract.',
              'What would be a good title for this article?', 'Give this abstract a concise, informative title.'),
    'title_choice': ('Which title belongs to this abstract?', 'Pick the title of the article this abstract comes from.',
                     'Of these titles, which one was written for this abstract?',
                     'Choose the correct title for the abstract below.'),
    'publication_type': ('Is this article a review, a case report, a clinical trial or a research article?',
                         'What type of publication is this: review, case report, clinical trial or research '
                         'article?', 'Classify this article by its publication type.', 'What kind of article is this?'),
    'sentence_section': ('Which section of a structured abstract is this sentence from: background, methods, '
                         'results or conclusions?', 'In which part of the abstract would this sentence appear?',
                         'Label this sentence with its abstract section.',
                         'Does this sentence belong to the background, methods, results or conclusions of its abstract?'),
    'conclusions': ('Write the conclusions of this abstract.', 'What do the authors conclude from these findings?',
                    'Complete this abstract with its conclusions.', 'Summarize the main conclusion this study draws.'),
    'mesh_topics': ('List the MeSH major topics of this article, separated by semicolons.',
                    'Which MeSH headings are the main topics of this article? Separate them with semicolons.',
                    'Give the major MeSH topics of this article, separated by semicolons.',
                    "Name the article's principal Medical Subject Headings, semicolon-separated."),
    'keywords': ('List the keywords of this article, separated by semicolons.',
                 'What are the author keywords of this article? Separate them with semicolons.',
                 "Give this article's keywords, separated by semicolons.",
                 'Provide the keywords the authors chose for this paper, semicolon-separated.'),
}
# The fixed options in other words, likewise: the first as the answers are named above, the last held out
OPTION_WORDINGS = {
    'publication_type': (str, str.capitalize, lambda o: {'case report': 'a case report', 'clinical trial': 'a clinical '
                         'trial', 'review': 'a review article', 'research article': 'an original research article'}[o]),
    'sentence_section': (str, str.capitalize, lambda o: f'the {o} section'),
}


def article_fields(el, text):
    """What the tasks need of a PubmedArticle, beside its text (records.py's rendering of it, for its split and drops)."""
    art = el.find('MedlineCitation/Article')
    sections = [(a.get('Label', '').strip(), a.get('NlmCategory', '').strip().upper(), squash(text_of(a)))
                for a in art.findall('Abstract/AbstractText')]
    mesh = [squash(text_of(h.find('DescriptorName'))) for h in el.findall('MedlineCitation/MeshHeadingList/MeshHeading')
            if h.find('DescriptorName') is not None and 'Y' in [h.find('DescriptorName').get('MajorTopicYN')] +
            [q.get('MajorTopicYN') for q in h.findall('QualifierName')]]
    title = art.find('ArticleTitle')
    return dict(text=text, title=squash(text_of(title)) if title is not None else '',
                sections=[s for s in sections if s[2]],
                types=[squash(text_of(t)) for t in art.findall('PublicationTypeList/PublicationType')],
                mesh=list(dict.fromkeys(mesh)),
                keywords=list(dict.fromkeys(squash(text_of(k)) for k in el.findall('MedlineCitation/KeywordList/Keyword') if squash(text_of(k)))))


def read_documents(files, min_chars):
    """doc id -> fields of the documents prepare.py keeps, in its order: the same records and the same rule
    (records.filter_documents: later versions, deletions, then empty, too short and duplicate texts). Plain text and
    PMC documents take part in the rule, with their text as their only field."""
    ids, rows, fields = [], [], []
    for path in tqdm(files, unit='file', desc='parse'):
        try:
            for doc_id, text, el in records_of(path, elements=True):
                ids.append(doc_id)
                rows.append(record_row(doc_id, text))
                pubmed = el is not None and el.tag == 'PubmedArticle'
                fields.append(article_fields(el, text) if pubmed and text else dict(text=text))
        except BAD_FILE as e:
            sys.exit(f'tasks.py: error: {path}: {type(e).__name__}: {squash(str(e))}')
    kept = filter_documents(record_table(rows).__getitem__, min_chars, Counter())
    return {ids[i]: fields[i] for i in kept.tolist()}


def clip(text, max_chars, keep_end=False):
    """text cut to at most max_chars at a sentence boundary (a word boundary if it has none), from its start, or
    with keep_end from its end."""
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:] if keep_end else text[:max_chars]
    bounds = [m.end() for m in re.finditer(r'[.!?]\s', cut)] if keep_end else [m.end() - 1 for m in re.finditer(r'[.!?]\s', cut)]
    if keep_end:
        return cut[bounds[0]:].strip() if bounds else cut[cut.find(' ') + 1:]
    return cut[:bounds[-1]].strip() if bounds else cut[:cut.rfind(' ')]


def sentences(text):
    return [s for s in re.split(r'(?<=[.!?])\s+(?=[A-Z0-9(\[])', text) if len(s) > 20]


def abstract_of(fields):
    return '\n'.join(f'{label}: {t}' if label.upper() not in NO_LABEL else t for label, _, t in fields['sections'])


def publication_type(types):
    if 'Case Reports' in types:
        return 'case report'
    if any(t.startswith('Clinical Trial') or t in ('Randomized Controlled Trial', 'Controlled Clinical Trial')
           for t in types):
        return 'clinical trial'
    if any(t in ('Review', 'Systematic Review', 'Meta-Analysis') for t in types):
        return 'review'
    return 'research article' if 'Journal Article' in types else None


def item(task, doc_id, content, answer, options=None, metric=None):
    record = dict(task=task, doc_id=doc_id, messages=[{'role': 'user', 'content': content},
                                                      {'role': 'assistant', 'content': answer}])
    if options is not None:
        record.update(options=options, answer=options.index(answer))
    else:
        record['metric'] = metric
    return record


def worded(record, wordings, held_out=False, fixed_options=False):
    """The item asked in one of the first `wordings` instruction wordings (and option phrasings), chosen by a hash of
    its text so that no other draw moves (wordings=1: the first, always), or held_out: in the last. fixed_options:
    the options as first phrased, so that every item of a task names its classes alike (eval.py's majority and
    balanced accuracy count classes by name)."""
    task, (ask, reply) = record['task'], record['messages']
    choice = zlib.crc32(f"{record['doc_id']}:{ask['content']}".encode())

    def pick(wordings_of_task):
        return wordings_of_task[-1] if held_out else wordings_of_task[choice % min(wordings, len(wordings_of_task) - 1)]

    phrase = pick(OPTION_WORDINGS[task]) if task in OPTION_WORDINGS and not fixed_options else str
    record = dict(record, messages=[{'role': 'user', 'content': f"{pick(INSTRUCTIONS[task])}\n\n{ask['content']}"},
                                    {'role': 'assistant', 'content': phrase(reply['content'])}])
    if 'options' in record:
        record['options'] = [phrase(o) for o in record['options']]
    return record


def document_items(doc_id, fields, titles, rng, max_chars, held_out, dropped):
    """The items of one document; titles: the other documents of its split, for distractors."""
    if 'sections' not in fields or not fields['title']:
        return []
    abstract = clip(abstract_of(fields), max_chars)
    items = [item('title', doc_id, abstract, fields['title'], metric='rougeL')]
    options = [fields['title']]
    while len(options) < 4:  # three distinct distractors, drawn without copying the split's titles per document
        other = titles[rng.randrange(len(titles))]
        options += [other] if other not in options else []
    rng.shuffle(options)
    items.append(item('title_choice', doc_id, abstract, fields['title'], options=options))
    kind = publication_type(fields['types'])
    if kind:
        items.append(item('publication_type', doc_id, clip(fields['title'] + '\n' + abstract_of(fields), max_chars),
                          kind, options=PUBLICATION_TYPES))
    by_section = {}
    for _, category, text in fields['sections']:
        if category in SECTIONS:
            by_section.setdefault(SECTIONS[category], []).extend(sentences(text))
    if len(fields['sections']) >= 3:  # a structured abstract
        per_section = 1 if held_out else 2  # held out: more documents rather than more sentences of one
        for section in sorted(by_section):
            for sentence in rng.sample(by_section[section], min(per_section, len(by_section[section]))):
                items.append(item('sentence_section', doc_id, clip(sentence, max_chars), section,
                                  options=list(dict.fromkeys(SECTIONS.values()))))
        rest = [s for s in fields['sections'] if s[1] != 'CONCLUSIONS']
        answer = ' '.join(t for _, c, t in fields['sections'] if c == 'CONCLUSIONS')
        if answer and len(answer) > max_chars // 2:
            dropped['conclusions_too_long'] += 1
        elif answer and rest:  # the sections nearest the conclusions (results) matter most: clip from the start
            items.append(item('conclusions', doc_id, clip(abstract_of(dict(sections=rest)), max_chars, keep_end=True),
                              answer, metric='rougeL'))
    for task, terms in (('mesh_topics', fields['mesh']), ('keywords', fields['keywords'])):
        if terms:
            items.append(item(task, doc_id, clip(fields['title'] + '\n' + abstract_of(fields), max_chars),
                              '; '.join(terms), metric='set_f1'))
    return items


def preference_pairs(items, seed):
    """DPO pairs of one split's items: chosen = the item's answer; rejected = for multiple choice a wrong option, for
    generation another document's answer to the same task (of this split, so a held-out pair holds only held-out
    text); never the same text."""
    answers = {}
    for i in items:
        if i['task'] in GENERATION:
            answers.setdefault(i['task'], []).append(i['messages'][1]['content'])
    copies = {task: Counter(pool) for task, pool in answers.items()}
    pairs = []
    for i in items:
        chosen = i['messages'][1]['content']
        pool = [o for o in i['options'] if o != chosen] if 'options' in i else answers[i['task']]
        if 'options' not in i and copies[i['task']][chosen] == len(pool):  # no other answer to draw
            continue
        rng = random.Random(f"{seed}:{i['doc_id']}:{i['task']}")
        rejected = chosen
        while rejected == chosen:
            rejected = pool[rng.randrange(len(pool))]
        pairs.append(dict(task=i['task'], doc_id=i['doc_id'], prompt=i['messages'][0]['content'], chosen=chosen,
                          rejected=rejected))
    return pairs


def cap_train(items, max_items, seed):
    """At most max_items items per task, a seeded sample in file order. The fixed-option tasks keep at most
    max_items / 4 per answer, so a skewed class (87% of the articles are research articles) cannot teach one
    answer for everything; the held-out splits keep the corpus's own mix, and report its majority rate."""
    groups = {}
    for i, it in enumerate(items):
        fixed = it['task'] in ('publication_type', 'sentence_section')
        groups.setdefault((it['task'], it['messages'][1]['content'] if fixed else ''), []).append(i)
    rng, keep = random.Random(seed), []
    for (task, answer), members in groups.items():
        limit = max_items // len(PUBLICATION_TYPES) if answer else max_items
        keep += rng.sample(members, limit) if len(members) > limit else members
    return [items[i] for i in sorted(keep)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('paths', nargs='*', help='PubMed XML files or folders; none: the inputs listed in data_dir')
    p.add_argument('--data_dir', required=True, help="prepare.py's output: its split fractions, min_chars and inputs")
    p.add_argument('--out', default='data/tasks', help='output folder, replaced only by a complete new one')
    p.add_argument('--max_chars', type=int, default=1500, help="longest document text in a prompt (cut at a sentence)")
    p.add_argument('--seed', type=int, default=1337, help='distractors, sentences, option order and rejected replies')
    p.add_argument('--max_train_items', type=int, default=0,
                   help='train split: at most this many items per task, the multiple-choice classes balanced; 0: all')
    p.add_argument('--pairs', action='store_true', help='write DPO preference pairs instead')
    p.add_argument('--tasks', default='', help='comma-separated task names to keep (an expert\'s group); default all')
    p.add_argument('--wordings', type=int, default=1, choices=(1, 2, 3),
                   help='instruction wordings (and option phrasings) items draw from; the held-out last one asks '
                        'test_unseen.jsonl (not with --pairs)')
    args = p.parse_args(argv)
    args.wanted = set(args.tasks.split(',')) if args.tasks else set(INSTRUCTIONS)
    if args.wanted - set(INSTRUCTIONS):
        p.error(f"unknown task {', '.join(sorted(args.wanted - set(INSTRUCTIONS)))}; the tasks: {', '.join(INSTRUCTIONS)}")
    return args


def input_paths(args):
    """data_dir's settings (meta.json), and the input files: the paths given, else the very files data_dir was
    prepared from."""
    meta_path = os.path.join(args.data_dir, 'meta.json')
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        settings = meta['settings']
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f'tasks.py: error: {meta_path}: not a prepared dataset ({type(e).__name__}: {e})')
    if args.paths:
        return settings, input_files(args.paths, lambda msg: sys.exit(f'tasks.py: error: {msg}'))
    for i in meta.get('inputs', []):  # the very bytes pre-training read, or its splits mean nothing here
        try:
            with open(i['path'], 'rb') as f:
                sha = hashlib.file_digest(f, 'sha256').hexdigest()
        except OSError as e:
            sys.exit(f"tasks.py: error: {i['path']} (an input of {meta_path}): {e.strerror}")
        if sha != i['sha256']:
            sys.exit(f"tasks.py: error: {i['path']} changed since {args.data_dir} was prepared (sha256 differs)")
    return settings, [i['path'] for i in meta.get('inputs', [])] or embedded_corpus()


def near_copies(train, held_out, batch=4096):
    """The held-out documents that share a 13-word n-gram with a train document (a companion paper, a reprint, a
    stock sentence): eval.py's contamination check, so that it finds none in tasks.py's held-out items."""
    ids = list(held_out)
    hashes, owner = ngram_hashes([held_out[d].get(k) or '' for d in ids for k in ('title', 'text')])
    table, texts = np.unique(hashes), [f.get(k) or '' for f in train.values() for k in ('title', 'text')]
    seen = np.zeros(len(table), bool)
    for a in range(0, len(texts) if len(table) else 0, batch):
        found = lookup(table, ngram_hashes(texts[a:a + batch])[0])
        seen[found[found >= 0]] = True
    return {ids[i // 2] for i in owner[seen[np.searchsorted(table, hashes)]]}


def split_items(docs, settings, args):
    """The items (or pairs) of every split, worded, their counts per task, the documents dropped, by reason, and
    the test items before wording."""
    by_split = {'train': {}, 'val': {}, 'test': {}}
    for doc_id, fields in docs.items():
        by_split[split_of(doc_id, settings['val_frac'], settings['test_frac'])][doc_id] = fields
    train_texts = {f['text'] for f in by_split['train'].values()} | {f.get('title') for f in by_split['train'].values()}
    dropped, counts, splits = Counter(), {}, {}
    for split, members in by_split.items():
        if split != 'train':  # nothing of a held-out document may have been trained on, not even a copy
            leaked = {d for d, f in members.items() if f['text'] in train_texts or f.get('title') in train_texts}
            dropped['held_out_copy_of_train'] += len(leaked)
            members = {d: f for d, f in members.items() if d not in leaked}
            near = near_copies(by_split['train'], members)
            dropped['held_out_shares_13_words_with_train'] += len(near)
            members = {d: f for d, f in members.items() if d not in near}
        titles = sorted({f['title'] for f in members.values() if f.get('title')})
        items = []
        for doc_id, fields in members.items():
            rng = random.Random(f'{args.seed}:{doc_id}')
            items += document_items(doc_id, fields, titles, rng, args.max_chars, split != 'train', dropped)
        if split == 'train' and args.max_train_items:
            items = cap_train(items, args.max_train_items, args.seed)
        items = [i for i in items if i['task'] in args.wanted]  # after the cap: the very items a run without --tasks keeps
        plain = items if split == 'test' else None
        items = [worded(i, args.wordings, fixed_options=split == 'test') for i in items]
        splits[split] = preference_pairs(items, args.seed) if args.pairs else items
        counts[split] = dict(sorted(Counter(i['task'] for i in splits[split]).items()))
    return by_split, splits, counts, dropped, plain


def main(argv=None):
    args = parse_args(argv)
    settings, files = input_paths(args)
    docs = read_documents(files, settings['min_chars'])
    if settings.get('licenses') or settings.get('exclude'):  # prepare.py kept fewer: only its documents give items
        kept = {row['id'] for row in manifest_rows(args.data_dir)}
        docs = {d: f for d, f in docs.items() if d in kept}
    by_split, splits, counts, dropped, plain_test = split_items(docs, settings, args)
    classes = {t: dict(Counter(i['messages'][1]['content'] for i in plain_test if i['task'] == t))
               for t in ('publication_type', 'sentence_section') if not args.pairs}
    if not args.pairs:
        splits['test_unseen'] = [worded(i, args.wordings, held_out=True) for i in plain_test]
    with atomic_folder(args.out) as tmp:  # a kill at any moment leaves the old output or the new one, whole
        for split, items in splits.items():
            with open(os.path.join(tmp, f'{split}.jsonl'), 'w', encoding='utf-8') as f:
                f.writelines(json.dumps(i, ensure_ascii=False) + '\n' for i in items)
        with open(os.path.join(tmp, 'counts.json'), 'w') as f:
            json.dump(dict(items=counts, dropped=dict(dropped), test_classes=classes, max_chars=args.max_chars,
                           max_train_items=args.max_train_items, data_dir=args.data_dir,
                           pairs=args.pairs, wordings=args.wordings), f, indent=2)
    print('\n| task | train | val | test |\n|---|---|---|---|')
    for task in [t for t in INSTRUCTIONS if t in args.wanted]:
        print(f"| {task} | " + ' | '.join(f"{counts[s].get(task, 0):,}" for s in ('train', 'val', 'test')) + ' |')
    print(f"documents: {', '.join(f'{s} {len(m):,}' for s, m in by_split.items())}; dropped: "
          + (', '.join(f'{k} {v:,}' for k, v in dropped.items()) or 'none') + f'; test classes: {classes}')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
