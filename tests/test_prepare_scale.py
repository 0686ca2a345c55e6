"""prepare.py as the corpus grows: memory per record, a killed run's work folder removed or reused, a rerun after
kill -9 giving the same shards, no worker outliving a kill -9, an existing tokenizer. pytest tests/test_prepare_scale.py
(about a minute and a half on 2 cores).

It is also the measuring harness for the table in docs/RESULTS.md, on tools/synth_pubmed.py's corpora:
  python tests/test_prepare_scale.py /tmp/pubmed_400k --tokenizer gpt2 --workers 2 --out /tmp/data_400k
prints the main process's peak RSS and heap (tracemalloc), the wall time and the work folder's peak on disk."""
import json
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# also run as a script (the measuring harness below): the project's modules and tools/, as conftest.py gives pytest
sys.path[1:1] = [ROOT, os.path.join(ROOT, "tools")]
import prepare
import records
import synth_pubmed
import tokenizer
from helpers import FAST, read_docs

GPT2 = ["--tokenizer", "gpt2", "--workers", "2", "--min_chars", "20"]


@pytest.fixture(scope="module")
def source():
    smallest = min((p for p in records.embedded_corpus() if p.endswith(".xml.gz")), key=os.path.getsize)
    synth_pubmed.SOURCE["parts"], synth_pubmed.SOURCE["pool"] = synth_pubmed.templates([smallest])


def corpus(folder, records, chars=240, per_file=10_000):
    """Small records (short abstracts) in baseline-style files: the per-record costs without the text's."""
    if not os.path.isdir(folder):
        os.makedirs(folder)
        for k, a in enumerate(range(0, records, per_file)):
            synth_pubmed.write_file((os.path.join(folder, f"pubmed26n{k + 1:04d}.xml.gz"), 40_000_000 + a,
                                     min(per_file, records - a), chars, k))
    return str(folder)


def measure(argv):
    """prepare.main(argv) with the main process's heap traced: (meta, peak heap bytes, the growth of the heap from
    the parse stage on, at its peak, wall seconds). The growth leaves out what every run loads first (GPT-2's ranks:
    ~10 MB) and what was allocated before the run."""
    parse_inputs, peaks, base = prepare.parse_inputs, [], []
    def traced(*args):
        peaks.append(tracemalloc.get_traced_memory()[1])
        base.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.reset_peak()
        return parse_inputs(*args)
    prepare.parse_inputs = traced
    tracemalloc.start()
    t = time.time()
    try:
        meta = prepare.main([str(a) for a in argv])
        peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
        prepare.parse_inputs = parse_inputs
    return meta, max(peaks), peaks[-1] - base[0], time.time() - t


def test_main_process_memory_per_record_is_a_few_dozen_bytes(tmp_path, source, monkeypatch):
    small, big = corpus(tmp_path / "small", 10_000), corpus(tmp_path / "big", 50_000)
    monkeypatch.setattr(prepare, "CHUNK_DOCS", 256)  # encode results in flight: a constant, made small beside the slope
    measure([small, "--out", tmp_path / "warm", *GPT2])  # what a process allocates once (the forkserver) is not a slope
    _, _, heap_small, _ = measure([small, "--out", tmp_path / "a", *GPT2])
    meta, _, heap_big, _ = measure([big, "--out", tmp_path / "b", *GPT2])
    assert sum(s["docs"] for s in meta["splits"].values()) == 50_000
    slope = (heap_big - heap_small) / 40_000
    print(f"heap: {heap_small / 1e6:.1f} MB at 10K records, {heap_big / 1e6:.1f} MB at 50K: {slope:.1f} bytes a record")
    # the old prepare.py held ~490 bytes of Python objects a record; numpy columns need ~20 at the peak
    assert slope < 40


def test_split_codes_match_split_of():
    ids = [f"pmid:{i}" for i in range(0, 2_000_000, 97)] + [records.text_id(str(i)) for i in range(5000)]
    codes = records.split_codes(np.array([records.id_hash(i) for i in ids], np.uint64), 0.1, 0.25)
    assert [records.SPLITS[c] for c in codes] == [records.split_of(i, 0.1, 0.25) for i in ids]


def test_a_killed_runs_work_folder_is_removed_or_reused_by_the_next_run(tmp_path, source):
    data = corpus(tmp_path / "in", 2000)
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    old_style = tmp_path / f"out.tmp-{dead.pid}"  # what prepare.py left before it had a work folder of its own
    old_style.mkdir()
    (old_style / "docs.txt").write_bytes(b"x" * 1000)
    alive = tmp_path / f"out.tmp-{os.getpid()}"  # a run still going: not ours to remove
    alive.mkdir()
    os.makedirs(tmp_path / "out.tmp" / "parsed")  # a killed run's, with a half-written cache entry
    (tmp_path / "out.tmp" / "parsed" / "0123.z.part").write_bytes(b"partial")
    meta = prepare.main([data, "--out", str(out), *GPT2])
    assert sorted(os.listdir(tmp_path)) == ["in", "out", alive.name]
    assert meta["resumed"] == {"parsed_files_reused": 0, "docs_already_encoded": 0}


KILL_MID_ENCODE = """
import os, signal, sys
import prepare
import tokenizer
prepare.CHUNK_DOCS, prepare.CHECKPOINT_S = 150, 0  # a checkpoint after every chunk of 150 documents
append, calls = prepare.append_tokens, [0]
def append_then_die(*args):
    append(*args)
    calls[0] += 1
    if calls[0] == 3 * 4 + 1:  # the 5th chunk's train tokens written, not yet checkpointed
        os.kill(os.getpid(), signal.SIGKILL)
prepare.append_tokens = append_then_die
prepare.main(sys.argv[1:])
"""


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_rerun_after_kill_9_mid_encode_writes_the_same_shards(tmp_path, source, kind):
    data = corpus(tmp_path / "in", 2000, per_file=500)
    args = [data, "--tokenizer", kind, *FAST, "--min_chars", "20", "--shard_tokens", "20000"]
    whole = prepare.main([*args, "--out", str(tmp_path / "whole")])
    killed = subprocess.run([sys.executable, "-c", KILL_MID_ENCODE, *args, "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.load(open(tmp_path / "out.tmp" / "state.json"))
    assert state["encode"]["next_doc"] == 4 * 150 and not os.path.exists(tmp_path / "out")
    meta = prepare.main([*args, "--out", str(tmp_path / "out")])
    assert meta["resumed"] == {"parsed_files_reused": 4, "docs_already_encoded": 600}
    assert not os.path.exists(tmp_path / "out.tmp")
    names = sorted(os.listdir(tmp_path / "whole"))
    assert names == sorted(os.listdir(tmp_path / "out")) and len(whole["splits"]["train"]["files"]) > 2
    for name in names:
        if name != "meta.json":
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    assert meta["splits"] == whole["splits"] and meta["dropped"] == whole["dropped"]
    # killed again, then run with other settings: the texts the killed run had dropped once encoded are parsed again
    subprocess.run([sys.executable, "-c", KILL_MID_ENCODE, *args, "--out", str(tmp_path / "out")], cwd=ROOT, timeout=120,
                   capture_output=True)
    other = prepare.main([*args, "--out", str(tmp_path / "out"), "--shard_tokens", "30000"])
    fresh = prepare.main([*args, "--out", str(tmp_path / "fresh"), "--shard_tokens", "30000"])
    assert other["resumed"]["docs_already_encoded"] == 0 and other["splits"] == fresh["splits"]
    assert all((tmp_path / "out" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes() for f in os.listdir(tmp_path / "fresh")
               if f != "meta.json")


def test_a_killed_run_with_exclude_resumes_to_the_same_shards_and_manifest(tmp_path, source):
    # the killed run has dropped the texts of the first file once encoded: the resumed one cannot scan them again
    data = corpus(tmp_path / "in", 2000, per_file=500)
    first = next(t for _, t in records.records_of(os.path.join(data, "pubmed26n0001.xml.gz")) if t)
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(json.dumps({"question": "Which?", "context": " ".join(first.split()[:30]), "options": ["a", "b"],
                               "answer": "a"}) + "\n")
    args = [data, "--tokenizer", "gpt2", *FAST, "--min_chars", "20", "--shard_tokens", "20000", "--exclude", str(mcq)]
    whole = prepare.main([*args, "--out", str(tmp_path / "whole")])
    killed = subprocess.run([sys.executable, "-c", KILL_MID_ENCODE, *args, "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    parsed = tmp_path / "out.tmp" / "parsed"
    assert any(not os.path.exists(parsed / n.replace(".npz", ".z")) for n in os.listdir(parsed) if n.endswith(".npz"))
    meta = prepare.main([*args, "--out", str(tmp_path / "out")])
    assert meta["resumed"]["docs_already_encoded"] == 600 and whole["excluded"][str(mcq)]["by_ngram"] >= 1
    assert meta["excluded"] == whole["excluded"] and meta["splits"] == whole["splits"]
    for name in os.listdir(tmp_path / "whole"):
        if name != "meta.json":
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def descendants(pid):
    """The processes pid started, and theirs, from /proc: pid -> start time (so a reused pid is not taken for one)."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # not a process, or gone
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime (19th)
        table[int(name)] = int(fields[1]), fields[19]
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                todo.append(child)
    return found


def alive(pid, start):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"  # a zombie has ended, only its parent has not reaped it yet


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table in /proc")
def test_kill_9_mid_parse_leaves_no_workers_and_a_rerun_at_once_writes_the_same_shards(tmp_path, source):
    # 4 files of 10,000 records: ~1 s a file, the time the old workers outlived a kill -9 of their run and wrote on
    # into the work folder, so that a rerun started at once failed (FileNotFoundError: ... .z.part -> ... .z)
    data = corpus(tmp_path / "in", 40_000)
    args = [data, *GPT2]
    whole = prepare.main([*args, "--out", str(tmp_path / "whole")])
    out, parsed = tmp_path / "out", tmp_path / "out.tmp" / "parsed"
    run = [sys.executable, os.path.join(ROOT, "prepare.py"), *args, "--out", str(out)]
    killed = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (parsed.is_dir() and any(n.endswith(".z.part") for n in os.listdir(parsed))):  # a worker is writing
        assert killed.poll() is None and time.time() < deadline, "prepare.py ended before it was killed"
        time.sleep(0.005)
    children = descendants(killed.pid)
    assert len(children) >= 4, children  # the forkserver, the resource tracker and the 2 parse workers
    killed.kill()
    killed.wait()
    t = time.time()
    rerun = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while any(alive(*c) for c in children.items()) and time.time() < t + 2:
        time.sleep(0.01)
    left = [pid for pid, start in children.items() if alive(pid, start)]
    assert not left, f"{len(left)} processes of the killed run still alive {time.time() - t:.1f} s after the kill"
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log[-3000:]
    meta = json.load(open(out / "meta.json"))
    assert meta["splits"] == whole["splits"] and meta["dropped"] == whole["dropped"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))
    for name in os.listdir(out):
        if name != "meta.json":
            assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not os.path.exists(tmp_path / "out.tmp")


def test_an_existing_tokenizer_encodes_the_new_data_and_its_fingerprint_is_recorded(tmp_path, source):
    first, second = corpus(tmp_path / "first", 1000, per_file=500), str(tmp_path / "second")
    os.makedirs(second)
    synth_pubmed.write_file((os.path.join(second, "pubmed26n0001.xml.gz"), 50_000_000, 800, 240, 99))
    a = prepare.main([first, "--out", str(tmp_path / "a"), *FAST])
    b = prepare.main([second, "--out", str(tmp_path / "b"), *FAST, "--tokenizer", str(tmp_path / "a")])
    fresh = prepare.main([second, "--out", str(tmp_path / "fresh"), *FAST])
    assert b["tokenizer_sha256"] == a["tokenizer_sha256"] != fresh["tokenizer_sha256"]
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert (b["vocab_size"], b["eos_id"], b["tokenizer_from"]) == (a["vocab_size"], a["eos_id"], str(tmp_path / "a"))
    _, docs = read_docs(tmp_path / "b")
    _, want = read_docs(tmp_path / "fresh")
    assert sorted(d for ds in docs.values() for d in ds) == sorted(d for ds in want.values() for d in ds)
    assert tokenizer.tokenizer_fingerprint({"tokenizer": "bpe", "tokenizer_file": "tokenizer.json"}, tmp_path / "a") \
        == a["tokenizer_sha256"]  # a folder prepared before meta.json recorded it
    assert tokenizer.gpt2_fingerprint(tokenizer.gpt2_encoding()) == tokenizer.GPT2_SHA256


if __name__ == "__main__":
    meta, heap, _, wall = measure(sys.argv[1:])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"main process: peak RSS {rss / 1e6:,.0f} MB, heap {heap / 2**20:,.0f} MiB; wall {wall:.1f} s, "
          f"disk peak {meta['disk']['peak_bytes'] / 1e6:,.0f} MB")
