"""
How a generated answer is scored against its reference (eval.py, for tasks.py's generation tasks): each metric a
function (prediction, reference) -> score in [0, 1], named in METRICS as an item's "metric" field names it.
"""
import re


def words(text):
    return re.findall(r'\w+', text.lower())


def rouge_l(prediction, reference):
    """ROUGE-L F1: the longest common subsequence of the two word sequences, as precision and recall."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:  # LCS by dynamic programming, one row at a time
        row = [0]
        for j, b in enumerate(r):
            row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))


def set_f1(prediction, reference):
    """F1 of the predicted terms against the reference terms, each a "; "-separated, case-insensitive set."""
    terms = lambda text: {' '.join(words(t)) for t in text.split(';')} - {''}
    p, r = terms(prediction), terms(reference)
    if not p or not r:
        return float(p == r)
    hits = len(p & r)
    return 2 * hits / (len(p) + len(r))


METRICS = {'rougeL': rouge_l, 'set_f1': set_f1, 'exact': lambda p, r: float(' '.join(words(p)) == ' '.join(words(r)))}
