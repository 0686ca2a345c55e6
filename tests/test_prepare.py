"""prepare.py on fixture PubMed/PMC/text files that the tests write themselves. Run: pytest tests/test_prepare.py"""
import gzip
import hashlib
import http.server
import json
import os
import random
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

import records
import tokenizer
from helpers import FAST, ROOT, WORDS, prep, pubmed_set, read_docs, write


def sentence(rng, n=12):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def article(pmid, title, abstract="", version=1):
    # a PubmedArticle as in the baseline files, with a cited PMID that must not be mistaken for the record's own
    return (f'<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="{version}">{pmid}</PMID>'
            f'<Article PubModel="Print"><Journal><Title>J Test Med</Title></Journal><ArticleTitle>{title}</ArticleTitle>'
            + (f"<Abstract>{abstract}</Abstract>" if abstract else "") +
            '<AuthorList><Author><LastName>Doe</LastName></Author></AuthorList></Article>'
            '<OtherAbstract Type="Publisher" Language="spa"><AbstractText>RESUMEN en otra lengua.</AbstractText></OtherAbstract>'
            '<CommentsCorrectionsList><CommentsCorrections RefType="Cites"><RefSource>X</RefSource>'
            '<PMID Version="1">999999</PMID></CommentsCorrections></CommentsCorrectionsList></MedlineCitation>'
            f'<PubmedData><ArticleIdList><ArticleId IdType="pubmed">{pmid}</ArticleId></ArticleIdList></PubmedData>'
            '</PubmedArticle>\n')


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


# -----------------------------------------------------------------------------
# text

def test_pubmed_record_semantics_versions_deletions_duplicates(tmp_path):
    rng = random.Random(0)
    a1, a1new, a2, a5, a8 = (sentence(rng) for _ in range(5))
    structured = (f'<AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">{a2} CO<sub>2</sub> and '
                  f'<i>E. coli</i>.</AbstractText>\n   <AbstractText Label="RESULTS">Better\n\t outcome.</AbstractText>'
                  '<CopyrightInformation>Copyright 2025 Elsevier.</CopyrightInformation>')
    baseline = pubmed_set(
        article(1, "First  title.", f"<AbstractText>{a1}</AbstractText>"),
        article(2, "Structured\n   <i>title</i>.", structured),
        article(3, "A title alone is not a document, however long it is."),
        article(4, "T.", "<AbstractText>Tiny.</AbstractText>"),
        article(5, "Fifth.", f'<AbstractText Label="UNLABELLED">{a1}</AbstractText>'),  # same text as 1's first version
        article(6, "Sixth.", f"<AbstractText>{a5}</AbstractText>"),
        article(9, "Structured\n   <i>title</i>.", structured),  # exact duplicate of 2
        '<PubmedBookArticle><BookDocument><PMID Version="1">8</PMID><Book><BookTitle>Handbook</BookTitle></Book>'
        f'<ArticleTitle>Chapter one.</ArticleTitle><Abstract><AbstractText>{a8}</AbstractText></Abstract>'
        "</BookDocument></PubmedBookArticle>\n")
    update = pubmed_set(article(1, "First title, revised.", f"<AbstractText>{a1new}</AbstractText>", version=2),
                        "<DeleteCitation><PMID Version=\"1\">6</PMID><PMID Version=\"1\">424242</PMID></DeleteCitation>\n")
    files = [write(tmp_path / "pubmed25n0002.xml.gz", update, gz=True), write(tmp_path / "pubmed25n0001.xml", baseline)]
    meta = prep(*files, "--out", tmp_path / "out", *FAST)  # given update first: order comes from the file names
    _, docs = read_docs(tmp_path / "out")
    got = sorted(d for split in docs.values() for d in split)
    want = sorted([f"First title, revised.\n{a1new}",
                   f"Structured title.\nBACKGROUND: {a2} CO2 and E. coli.\nRESULTS: Better outcome.",
                   f"Fifth.\n{a1}",  # no longer a duplicate once 1 was replaced
                   f"Chapter one.\n{a8}"])
    assert got == want
    assert meta["dropped"] == {"replaced": 1, "deleted": 1, "empty": 1, "too_short": 1, "duplicate": 1}
    assert [i["path"] for i in meta["inputs"]] == files[::-1]
    assert meta["inputs"][0]["sha256"] == hashlib.sha256(open(files[1], "rb").read()).hexdigest()


def test_pmc_article_is_title_abstract_and_body_without_refs_tables_captions(tmp_path):
    nxml = """<?xml version="1.0"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 20190208//EN" "JATS-archivearticle1.dtd">
<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:mml="http://www.w3.org/1998/Math/MathML" article-type="research-article">
<front><journal-meta><journal-title-group><journal-title>J</journal-title></journal-title-group></journal-meta>
<article-meta><article-id pub-id-type="pmid">111</article-id><article-id pub-id-type="pmc">222</article-id>
<title-group><article-title>Full <italic>text</italic>
 title</article-title></title-group>
<abstract><sec><title>Background</title><p>Abstract background.</p></sec><sec><title>Results</title><p>Abstract results.</p></sec></abstract>
</article-meta></front>
<body><sec><title>Introduction</title><p>Intro cites <xref ref-type="bibr" rid="r1">[1]</xref> and <italic>E. coli</italic>.</p>
<p>See the table<table-wrap id="t1"><label>Table 1</label><caption><p>TABLE CAPTION</p></caption><table><tr><td>CELL</td></tr></table></table-wrap> above.</p>
<fig id="f1"><label>Figure 1</label><caption><title>FIG TITLE</title><p>FIG CAPTION</p></caption><graphic xlink:href="f1.jpg"/></fig>
<p>Energy is<disp-formula><tex-math>E=mc^2</tex-math></disp-formula>famous.</p>
<sec><title>Methods</title><p>We used <inline-formula><mml:math><mml:mi>n</mml:mi></mml:math></inline-formula> samples.</p>
<list><list-item><p>First item.</p></list-item></list></sec></sec></body>
<back><ack><p>ACK TEXT</p></ack><ref-list><ref id="r1"><mixed-citation>REF TEXT</mixed-citation></ref></ref-list></back>
<floats-group><fig><caption><p>FLOAT CAPTION</p></caption></fig></floats-group>
</article>"""
    got = list(records.records_of(write(tmp_path / "a.nxml", nxml)))
    assert got == [("pmc:222", "Full text title\nBackground\nAbstract background.\nResults\n"
                                   "Abstract results.\nIntroduction\nIntro cites [1] and E. coli.\nSee the table "
                                   "above.\nEnergy is famous.\nMethods\nWe used n samples.\nFirst item.")]


def test_text_and_jsonl_documents_are_normalised_and_deduplicated(tmp_path):
    txt = write(tmp_path / "notes.txt", "First note,\r\n  over   two lines.\r\n\r\n\r\nSecond note.\n   \nThird note.\n")
    jsonl = write(tmp_path / "more.jsonl", '{"text": "Second note."}\n\n{"text": "A json\\n\\ndocument.", "id": 7}\n')
    out = tmp_path / "data" / "out"  # data/ does not exist yet, as in a fresh clone
    prep(txt, jsonl, "--out", out, *FAST, "--min_chars", "5")
    meta, docs = read_docs(out)
    assert sorted(d for split in docs.values() for d in split) == [
        "A json\ndocument.", "First note,\nover two lines.", "Second note.", "Third note."]
    assert meta["dropped"] == {"duplicate": 1}


# -----------------------------------------------------------------------------
# splits and tokens

def test_split_is_a_function_of_the_id_and_adding_inputs_moves_no_document(tmp_path):
    ids = [f"pmid:{i}" for i in range(20000)]
    splits = [records.split_of(i, 0.1, 0.2) for i in ids]
    assert splits == [records.split_of(i, 0.1, 0.2) for i in ids]
    assert abs(splits.count("val") / len(ids) - 0.1) < 0.01 and abs(splits.count("test") / len(ids) - 0.2) < 0.01
    # test takes the top of the hash range: a bigger val fraction moves no test document
    assert all(records.split_of(i, 0.3, 0.2) == "test" for i, s in zip(ids, splits) if s == "test")

    rng = random.Random(1)
    first = [json.dumps({"text": sentence(rng)}) for _ in range(60)]
    more = [json.dumps({"text": sentence(rng)}) for _ in range(60)]
    a = write(tmp_path / "a.jsonl", "\n".join(first))
    args = ["--val_frac", "0.2", "--test_frac", "0.2", *FAST]
    prep(a, "--out", tmp_path / "one", *args)
    prep(write(tmp_path / "b.jsonl", "\n".join(more)), a, "--out", tmp_path / "two", *args)
    where = []
    for out in ("one", "two"):
        _, docs = read_docs(tmp_path / out)
        where.append({d: split for split, ds in docs.items() for d in ds})
        assert sum(map(len, docs.values())) == len(where[-1])  # no document in two splits
        assert all(docs.values())
    assert len(where[0]) == 60 and len(where[1]) == 120
    assert all(where[1][d] == s for d, s in where[0].items())


UNICODE_DOCS = ["Café au lait, naïve coöperation: 5 µg/kg β-blocker, ≤ 0.5 mmol/L.",
                "日本語の文書と絵文字 🧬🦠 and Ελληνικά with combining a\u0301 marks.",
                "A literal [EOS] and [PAD] and <|endoftext|> stay text.",
                "Tabs\tand   runs of spaces are squashed;\nlines kept."]


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_shards_decode_back_to_the_documents_and_meta_counts_them(tmp_path, kind):
    rng = random.Random(2)
    texts = [sentence(rng, 30) for _ in range(80)] + [d.replace("\t", " ").replace("   ", " ") for d in UNICODE_DOCS]
    inp = write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    meta = prep(inp, "--out", out, "--tokenizer", kind, "--shard_tokens", "1000", "--val_frac", "0.1", "--test_frac", "0.1", *FAST)
    meta2, docs = read_docs(out)
    assert meta == meta2
    assert sorted(d for ds in docs.values() for d in ds) == sorted(texts)
    for split, s in meta["splits"].items():
        assert s["docs"] == len(docs[split]) > 0
        assert s["bytes"] == sum(len(d.encode()) for d in docs[split])
        sizes = [os.path.getsize(out / f) // 2 for f in s["files"]]
        assert sum(sizes) == s["tokens"]
    files = meta["splits"]["train"]["files"]
    assert len(files) > 2 and files[:2] == ["train_0000.bin", "train_0001.bin"]
    assert [os.path.getsize(out / f) // 2 for f in files[:-1]] == [1000] * (len(files) - 1)
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["files"] == ["val.bin"]
    assert sorted(os.listdir(out)) == sorted(files + ["val.bin", "test.bin", "meta.json", "manifest.tsv.gz"]
                                             + (["tokenizer.json"] if kind == "bpe" else []))
    tok = tokenizer.load_tokenizer(out)
    assert tok.kind == kind and tok.vocab_size == meta["vocab_size"] and tok.eos_id == meta["eos_id"]
    assert tok.eos_id not in tok.encode(UNICODE_DOCS[2])  # no specials from text, none added
    if kind == "bpe":
        assert (meta["vocab_size"], meta["eos_id"], meta["bos_id"], meta["pad_id"], meta["unk_id"]) == (300, 3, 2, 0, 1)
        assert meta["tokenizer_file"] == "tokenizer.json"
    else:
        assert (meta["vocab_size"], meta["eos_id"], meta["tokenizer_file"]) == (50257, 50256, None)
        assert tok.encode("Hello world") == [15496, 995]  # GPT-2's own ids


# -----------------------------------------------------------------------------
# bad input and safety

def good_file(tmp_path):
    return write(tmp_path / "good.txt", "A perfectly good document about aspirin and the heart.\n")


@pytest.mark.parametrize("name, data, says", [
    ("cut.xml.gz", gzip.compress(pubmed_set(article(1, "T.", "<AbstractText>Some text here.</AbstractText>")).encode())[:-40], "EOFError"),
    ("broken.xml", pubmed_set(article(1, "T.", "<AbstractText>unclosed")), "ParseError"),
    ("latin1.txt", "Caf\xe9 au lait\n".encode("latin-1"), "UnicodeDecodeError"),
    ("empty.txt", b"", "empty input"),
    ("notes.pdf", b"%PDF-1.4", "unknown extension"),
])
def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path, name, data, says):
    bad = write(tmp_path / name, data)
    r = run_cli(good_file(tmp_path), bad, "--out", tmp_path / "out", *FAST)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("prepare.py: error: ") and bad in last and says in last, r.stderr
    assert not os.path.exists(tmp_path / "out")
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []


def test_skip_bad_warns_counts_and_goes_on(tmp_path, capsys):
    bad = [write(tmp_path / "broken.xml", "<PubmedArticleSet><PubmedArticle>"), write(tmp_path / "x.docx", b"PK")]
    meta = prep(good_file(tmp_path), *bad, "--out", tmp_path / "out", "--skip_bad", *FAST)
    assert len(meta["bad_inputs"]) == 2 and all(b in m for b, m in zip(sorted(bad), sorted(meta["bad_inputs"])))
    assert capsys.readouterr().err.count("prepare.py: warning: skipping") == 2
    assert [i["path"] for i in meta["inputs"]] == [str(tmp_path / "good.txt")]


def test_failed_run_leaves_the_existing_dataset_untouched(tmp_path):
    out = tmp_path / "out"
    prep(good_file(tmp_path), "--out", out, *FAST)
    before = {f: open(out / f, "rb").read() for f in os.listdir(out)}
    bad = write(tmp_path / "broken.xml", "<PubmedArticleSet><PubmedArticle>")
    r = run_cli(good_file(tmp_path), bad, "--out", out, *FAST)
    assert r.returncode == 1
    assert {f: open(out / f, "rb").read() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["broken.xml", "good.txt", "out"]  # no temporary folder left behind
    # a complete run does replace it
    prep(write(tmp_path / "other.txt", "Another good document, about insulin this time.\n"), "--out", out, *FAST)
    assert sorted(d for ds in read_docs(out)[1].values() for d in ds) == ["Another good document, about insulin this time."]
    # and a folder that is not a dataset is never replaced
    (tmp_path / "mine").mkdir()
    write(tmp_path / "mine" / "thesis.tex", "precious")
    with pytest.raises(SystemExit, match="not a dataset"):
        prep(good_file(tmp_path), "--out", tmp_path / "mine", *FAST)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


def test_gpt2_without_a_ranks_file_says_how_to_fix_it(tmp_path, monkeypatch):
    r = run_cli(good_file(tmp_path), "--tokenizer", "gpt2", "--gpt2_ranks", tmp_path / "nope.tiktoken", "--out", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "nope.tiktoken" in r.stderr, r.stderr
    # no whisper package and no network
    def no_package(name):
        raise tokenizer.importlib.metadata.PackageNotFoundError(name)
    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tokenizer.importlib.metadata, "files", no_package)
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", no_network)
    with pytest.raises(SystemExit, match="pip install --no-deps openai-whisper, or pass --gpt2_ranks"):
        tokenizer.gpt2_encoding()


# -----------------------------------------------------------------------------
# download

@pytest.fixture
def server():
    """A local HTTP server over a dict of files, with Range support; it logs (path, Range header) of each GET."""
    files, log = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append((self.path, self.headers.get("Range")))
            data = files.get(self.path)
            if data is None:
                return self.send_error(404)
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            if start >= len(data) and start:
                return self.send_error(416)
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    def add(name, data, md5=None):
        files["/pubmed/" + name] = data
        files["/pubmed/" + name + ".md5"] = f"MD5({name})= {md5 or hashlib.md5(data).hexdigest()}\n".encode()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}/pubmed/", add=add, log=log)
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_md5_resumes_partial_files_and_skips_verified_ones(tmp_path, server):
    rng = random.Random(3)
    texts = [[sentence(rng, 40) for _ in range(30)] for _ in range(3)]
    blobs = [gzip.compress(pubmed_set(*(article(100 * n + i, f"Title {n} {i}.", f"<AbstractText>{t}</AbstractText>")
                                        for i, t in enumerate(ts))).encode()) for n, ts in enumerate(texts)]
    server.add("pubmed25n0001.xml.gz", blobs[0])
    server.add("pubmed25n0002.xml.gz", blobs[1])
    server.add("pubmed25n0003.xml.gz", blobs[2], md5="0" * 32)
    cache = tmp_path / "cache"
    cache.mkdir()
    write(cache / "pubmed25n0002.xml.gz.part", blobs[1][:1000])  # an interrupted earlier download
    args = ["--base_url", server.url, "--cache", cache, "--out", tmp_path / "out", *FAST]

    meta = prep("--download", "1-2", *args)
    assert ("/pubmed/pubmed25n0002.xml.gz", "bytes=1000-") in server.log
    assert open(cache / "pubmed25n0002.xml.gz", "rb").read() == blobs[1]
    assert sorted(os.listdir(cache)) == ["pubmed25n0001.xml.gz", "pubmed25n0001.xml.gz.md5",
                                         "pubmed25n0002.xml.gz", "pubmed25n0002.xml.gz.md5"]
    assert sum(s["docs"] for s in meta["splits"].values()) == 60

    server.log.clear()
    prep("--download", "1-2", *args)
    assert server.log == []  # verified files are neither fetched nor re-checked online

    with pytest.raises(SystemExit, match="pubmed25n0003.xml.gz.*md5 mismatch"):
        prep("--download", "1-3", *args)
    assert not os.path.exists(cache / "pubmed25n0003.xml.gz") and not os.path.exists(cache / "pubmed25n0003.xml.gz.part")
    meta = prep("--download", "1-3", "--skip_bad", *args)
    assert len(meta["bad_inputs"]) == 1 and sum(s["docs"] for s in meta["splits"].values()) == 60
