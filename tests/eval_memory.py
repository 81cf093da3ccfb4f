#!/usr/bin/env python3
"""Evaluation of msa_memory on real text: a haystack of Debian `fortunes` with planted
single-hop facts and two-hop chains.

Corpus (deterministic for a seed):
  * haystack: the fortunes in /usr/share/games/fortunes (package `fortunes`; files
    split on lines holding only '%', stripped, de-duplicated: ~15.1K texts). Up to
    that many, a seeded sample without repetition; above it (100K), every fortune
    once plus "augmented" documents, each the join of two different random fortunes
    (a seeded pair, never the same pair twice). So at 100K every fortune occurs in ~12
    documents: an interleave query that appends a weakly matching runner-up's text
    routes straight to that text's copies (the v1 lexical encoder's two-hop recall
    fell to 0.055 for this reason; see LexicalEncoder.focus_gate).
  * planted facts, each embedded in a random host fortune (before or after it):
    single-hop: one sentence naming an invented entity and its answer; the question
    shares the entity name and some words with it.
    two-hop chains: A names an invented entity x and a person p; B says something
    about p that holds the answer. The question shares words with A only: the
    generator checks that it shares no content word with B's sentence. So a single
    round of search has no lexical path to B; memory interleave (read A, append it,
    route again) must find B through p's name.
  Invented names are pseudo-words from syllables that occur nowhere in the haystack.

Metrics:
  * single-hop recall@k of search (fact document in the top k);
  * two-hop chains: search top-K recall of A, of B and of both (K = rounds x k per
    round, the same number of documents interleave may read), and interleave
    evidence recall (both A and B among the documents it read);
  * the same with a TF-IDF baseline (scikit-learn TfidfVectorizer, sublinear tf,
    English stopwords, word 1-2 grams, cosine) over the same documents and
    questions, and a TF-IDF interleave with the same loop (query rows = paragraphs,
    max over rows, like QUERY_MAX).

Run:  MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/eval_memory.py --sizes 1000,10000 [--json out.json]
      (starts its own msad on a temp dir with --sync nosync, or --addr HOST:PORT)
or    ops/eval-memory
"""
import argparse
import json
import os
import random
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FORTUNE_DIR = "/usr/share/games/fortunes"
SOURCE = os.environ.get("MSA_SOURCE") or os.path.dirname(HERE)
BIN = os.environ.get("MSA_BIN") or os.path.join(SOURCE, "build", "bin")
PYDIR = os.environ.get("MSA_PYTHON") or os.path.join(os.path.dirname(os.path.abspath(BIN)), "python")


def setup_paths():
    """msa_client from the build (generated stubs), msa_memory from the build when it
    was copied there, else from the source tree (appended, so the source msa_client,
    which lacks the stubs, never shadows the built one)."""
    if PYDIR not in sys.path:
        sys.path.insert(0, PYDIR)
    src = os.path.join(SOURCE, "client", "python")
    if not os.path.isdir(os.path.join(PYDIR, "msa_memory")) and src not in sys.path:
        sys.path.append(src)

# ---- haystack -------------------------------------------------------------------------


def load_fortunes(path=FORTUNE_DIR):
    """Every fortune text, de-duplicated, in a fixed order; [] when the package is absent."""
    if not os.path.isdir(path):
        return []
    seen, out = set(), []
    for f in sorted(os.listdir(path)):
        p = os.path.join(path, f)
        if "." in f or os.path.islink(p) or not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        for d in re.split(r"(?m)^%\s*$", text):
            d = d.strip()
            if d and d not in seen and re.search(r"[A-Za-z]{3}", d):
                seen.add(d)
                out.append(d)
    return out


def haystack(fortunes, n, seed=0):
    """n documents (texts) from the fortunes; see the module doc for n > len(fortunes)."""
    rng = random.Random(seed)
    if n <= len(fortunes):
        return rng.sample(fortunes, n)
    out = list(fortunes)
    rng.shuffle(out)
    pairs = set()
    m = len(fortunes)
    while len(out) < n:
        a, b = rng.randrange(m), rng.randrange(m)
        if a == b or (a, b) in pairs:
            continue
        pairs.add((a, b))
        out.append(fortunes[a] + "\n" + fortunes[b])
    return out


# ---- planted facts --------------------------------------------------------------------

SINGLE = [
    ("The password for the {x} vault is {a}.", "What is the password for the {x} vault?"),
    ("{X} keeps the spare boat keys in a tin marked {a}.", "Where does {X} keep the spare boat keys?"),
    ("The {x} choir rehearses every Thursday in the {a} hall.", "Where does the {x} choir rehearse?"),
    ("Dr. {X} prescribed {a} tea for the migraine.", "What did Dr. {X} prescribe for a migraine?"),
    ("The annual {x} regatta was won by the sloop {a}.", "Which boat won the {x} regatta?"),
    ("{X} hid the treasure map inside a copy of {a}.", "In which book did {X} hide the treasure map?"),
]

CHAINS = [
    ("The {x} ledger was entrusted to {p}.",
     "{p} moved to a lighthouse outside {a} last winter.",
     "Where does the keeper of the {x} ledger live now?"),
    ("The {x} expedition was headed by {p}.",
     "{p} was born in the mountain village of {a}.",
     "What is the birthplace of the leader of the {x} expedition?"),
    ("The {x} bridge was designed by {p}.",
     "{p} owns a grey falcon called {a}.",
     "Which bird belongs to the engineer of the {x} bridge?"),
    ("{p} stole the {x} diamond in broad daylight.",
     "{p} spends every evening at the {a} tavern.",
     "Where can the thief of the {x} diamond be found at night?"),
    ("The {x} orchestra is conducted by {p}.",
     "{p} drives an old red tractor named {a}.",
     "What vehicle does the conductor of the {x} orchestra use?"),
    ("The {x} recipe was invented by {p}.",
     "{p} studied chemistry at the University of {a}.",
     "Where did the creator of the {x} recipe go to college?"),
]

_ON = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "qu", "r", "s",
       "st", "t", "th", "v", "z", "zh", "x", "vr"]
_VO = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CO = ["", "", "n", "r", "l", "s", "th", "x", "nd", "rk", "v"]


class Names:
    """Pseudo-words that occur nowhere in `vocab`, never twice."""

    def __init__(self, rng, vocab):
        self.rng, self.vocab, self.used = rng, vocab, set()

    def word(self, syl=(2, 3)):
        while True:
            n = self.rng.randint(*syl)
            w = "".join(self.rng.choice(_ON) + self.rng.choice(_VO) + self.rng.choice(_CO)
                        for _ in range(n))
            if 5 <= len(w) <= 12 and w not in self.vocab and w not in self.used:
                self.used.add(w)
                return w.capitalize()


def _content(text):
    setup_paths()
    from msa_memory.encoders import LexicalEncoder, STOPWORDS
    return {LexicalEncoder._norm(w) for w in LexicalEncoder.words(text) if w not in STOPWORDS}


def plant(docs, n_single, n_chain, seed=0):
    """Embeds facts into random host documents and appends them to docs (the planted
    documents replace as many haystack documents, so len(docs) stays the same).
    Returns (docs, questions) with questions = [{"kind": "single"|"chain", "q": text,
    "need": [doc indices, in hop order], "answer": word}]."""
    rng = random.Random(seed + 7)
    vocab = set()
    for d in docs:
        vocab.update(w.lower() for w in re.findall(r"[^\W_]+", d))
    names = Names(rng, vocab)
    docs = list(docs)
    n_plant = n_single + 2 * n_chain
    if n_plant > len(docs):
        raise ValueError("too many planted facts for %d documents" % len(docs))
    slots = rng.sample(range(len(docs)), n_plant)     # documents replaced by planted ones
    hosts = [docs[i] for i in slots]
    it = iter(zip(slots, hosts))
    questions = []

    def put(sentence):
        i, host = next(it)
        docs[i] = (sentence + "\n" + host) if rng.random() < 0.5 else (host + "\n" + sentence)
        return i

    for j in range(n_single):
        f, q = SINGLE[j % len(SINGLE)]
        x, a = names.word(), names.word()
        ctx = {"x": x, "X": x, "a": a}
        questions.append({"kind": "single", "q": q.format(**ctx), "need": [put(f.format(**ctx))],
                          "answer": a})
    for j in range(n_chain):
        fa, fb, q = CHAINS[j % len(CHAINS)]
        x, a = names.word(), names.word()
        p = names.word((1, 2)) + " " + names.word((1, 2))
        ctx = {"x": x, "p": p, "a": a}
        qa, qb, qq = fa.format(**ctx), fb.format(**ctx), q.format(**ctx)
        assert not (_content(qq) & _content(qb)), (qq, qb)
        questions.append({"kind": "chain", "q": qq, "need": [put(qa), put(qb)], "answer": a})
    return docs, questions


def corpus(n, n_single, n_chain, seed=0, fortunes=None):
    fortunes = fortunes if fortunes is not None else load_fortunes()
    return plant(haystack(fortunes, n, seed), n_single, n_chain, seed)


# ---- TF-IDF baseline --------------------------------------------------------------------


class TfidfIndex:
    """scikit-learn TF-IDF (sublinear tf, English stopwords, 1-2 grams), cosine."""

    def __init__(self, docs):
        from sklearn.feature_extraction.text import TfidfVectorizer
        self.vec = TfidfVectorizer(sublinear_tf=True, stop_words="english", ngram_range=(1, 2),
                                   dtype=np.float32)
        self.X = self.vec.fit_transform(docs).tocsr()
        self.docs = docs

    def scores(self, text):
        """text: a string (rows = paragraphs) or a list of row strings; the score is
        the max over rows (like QUERY_MAX)."""
        if isinstance(text, str):
            paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()] or [text]
        else:
            paras = list(text) or [""]
        Q = self.vec.transform(paras)
        s = (self.X @ Q.T).toarray()
        return s.max(axis=1)

    def search(self, text, k, exclude=()):
        s = self.scores(text)
        if exclude:
            s[list(exclude)] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        return [(int(i), float(s[i])) for i in top]

    def interleave(self, question, max_rounds, k_per_round, threshold=0.0, rows=None):
        """The same loop as Memory.interleave. rows=None: the query is the question and
        the evidence read so far, one row per paragraph; rows=f: f(question, evidence)
        -> row strings (e.g. the LexicalEncoder's focus rows, to compare routers with
        the same query construction)."""
        read, ctx = [], [question]
        for _ in range(max_rounds):
            q = "\n\n".join(ctx) if rows is None else rows(question, ctx[1:])
            hits = [(i, s) for i, s in self.search(q, k_per_round, read)
                    if s > threshold]
            if not hits:
                break
            for i, _s in hits:
                read.append(i)
                ctx.append(self.docs[i])
        return read


# ---- the evaluation ---------------------------------------------------------------------


def evaluate(search, interleave, questions, ks=(1, 5, 10), rounds=3, kpr=2):
    """search(q, k) -> [doc index]; interleave(q) -> [doc index read]. Returns metrics."""
    K = rounds * kpr
    single = [q for q in questions if q["kind"] == "single"]
    chains = [q for q in questions if q["kind"] == "chain"]
    kmax = max(max(ks), K)
    m = {}
    hit = {k: 0 for k in ks}
    il_single = 0
    for q in single:
        got = search(q["q"], kmax)
        for k in ks:
            hit[k] += q["need"][0] in got[:k]
        il_single += q["need"][0] in interleave(q["q"])
    for k in ks:
        m["single_recall@%d" % k] = hit[k] / max(1, len(single))
    m["single_interleave_recall"] = il_single / max(1, len(single))
    a = b = both = il_both = il_b = 0
    both10 = 0
    for q in chains:
        got = search(q["q"], kmax)
        A, B = q["need"]
        a += A in got[:K]
        b += B in got[:K]
        both += A in got[:K] and B in got[:K]
        both10 += A in got[:10] and B in got[:10]
        ev = interleave(q["q"])
        il_both += A in ev and B in ev
        il_b += B in ev
    n = max(1, len(chains))
    m.update({"chain_search_A@%d" % K: a / n, "chain_search_B@%d" % K: b / n,
              "chain_search_both@%d" % K: both / n, "chain_search_both@10": both10 / n,
              "chain_interleave_B": il_b / n, "chain_interleave_both": il_both / n,
              "n_single": len(single), "n_chain": len(chains)})
    return m


def run_size(n, args, fortunes):
    setup_paths()
    from msa_memory import LexicalEncoder, Memory
    n_single = args.single or max(30, min(200, n // 50))
    n_chain = args.chains or n_single
    t0 = time.monotonic()
    docs, questions = corpus(n, n_single, n_chain, args.seed, fortunes)
    t_corpus = time.monotonic() - t0
    res = {"documents": n, "single": n_single, "chains": n_chain}
    enc = LexicalEncoder(**json.loads(args.encoder_kw or "{}"))
    res["encoder"] = enc.identity
    name = "eval_%d_%d" % (n, os.getpid())
    mem = Memory(args.addr, name, enc, timeout=600)
    try:
        t0 = time.monotonic()
        ids = mem.add_many(docs, ids=list(range(1, n + 1)), batch=args.batch)
        t_ingest = time.monotonic() - t0
        info = mem.client.describe(name)
        res.update({"ingest_s": round(t_ingest, 2), "docs_per_s": round(n / t_ingest, 1),
                    "chunks": info["chunks"], "tokens": info["tokens"],
                    "stored_mb": round(info["bytes"] / 2**20, 1),
                    "bytes_per_doc": int(info["bytes"] / n)})
        ix = {i: j for j, i in enumerate(ids)}
        lat = []

        def msa_search(q, k):
            t = time.monotonic()
            r = [ix[i] for i, _ in mem.route(q, k)[0]]
            lat.append(time.monotonic() - t)
            return r

        def msa_il(q):
            return [ix[i] for i in mem.interleave(q, args.rounds, args.kpr, args.budget,
                                                  args.threshold).ids]

        t0 = time.monotonic()
        res["lexical"] = evaluate(msa_search, msa_il, questions, rounds=args.rounds, kpr=args.kpr)
        res["lexical"]["eval_s"] = round(time.monotonic() - t0, 2)
        res["lexical"]["route_ms_p50"] = round(1000 * float(np.median(lat)), 2)
    finally:
        if not args.keep:
            try:
                mem.client.drop_collection(name)
            except Exception:
                pass
        mem.close()
    if not args.no_tfidf:
        try:
            t0 = time.monotonic()
            tf = TfidfIndex(docs)
            res["tfidf"] = evaluate(lambda q, k: [i for i, _ in tf.search(q, k)],
                                    lambda q: tf.interleave(q, args.rounds, args.kpr),
                                    questions, rounds=args.rounds, kpr=args.kpr)
            res["tfidf"]["eval_s"] = round(time.monotonic() - t0, 2)
            rows = lambda q, ev: [" ".join(w) for w in enc.interleave_windows(q, ev)]  # noqa: E731
            m = evaluate(lambda q, k: [i for i, _ in tf.search(q, k)],
                         lambda q: tf.interleave(q, args.rounds, args.kpr, rows=rows),
                         questions, rounds=args.rounds, kpr=args.kpr)
            res["tfidf"]["chain_interleave_focus_both"] = m["chain_interleave_both"]
            res["tfidf"]["single_interleave_focus_recall"] = m["single_interleave_recall"]
        except ImportError:
            res["tfidf"] = None
    res["corpus_s"] = round(t_corpus, 2)
    return res


def table(results, rounds, kpr):
    K = rounds * kpr
    rows = [("single recall@1", "single_recall@1"), ("single recall@5", "single_recall@5"),
            ("single recall@10", "single_recall@10"),
            ("single via interleave", "single_interleave_recall"),
            ("2-hop search A@%d" % K, "chain_search_A@%d" % K),
            ("2-hop search B@%d" % K, "chain_search_B@%d" % K),
            ("2-hop search both@%d" % K, "chain_search_both@%d" % K),
            ("2-hop search both@10", "chain_search_both@10"),
            ("2-hop interleave B", "chain_interleave_B"),
            ("2-hop interleave both", "chain_interleave_both"),
            ("2-hop il. focus rows", "chain_interleave_focus_both")]
    head = "%-24s" % "metric"
    for r in results:
        head += " | %8s lex | %8s tfidf" % (r["documents"], r["documents"])
    lines = [head, "-" * len(head)]
    for label, key in rows:
        line = "%-24s" % label
        for r in results:
            tf = r.get("tfidf") or {}
            lx = r["lexical"].get(key)
            if key == "chain_interleave_focus_both":
                lx = r["lexical"]["chain_interleave_both"]
            line += " | %12.3f | %14s" % (lx, "%.3f" % tf[key] if key in tf else "-")
        lines.append(line)
    for r in results:
        lines.append("%d docs: %d single + %d chains, %d chunks, %.1f MB stored (%d B/doc), "
                     "ingest %.1f s (%.0f docs/s), route p50 %.1f ms"
                     % (r["documents"], r["single"], r["chains"], r["chunks"], r["stored_mb"],
                        r.get("bytes_per_doc", 0), r["ingest_s"], r["docs_per_s"],
                        r["lexical"]["route_ms_p50"]))
    if results and results[0].get("encoder"):
        lines.append("encoder: " + results[0]["encoder"])
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--addr", help="a running msad (default: start one on a temp dir)")
    ap.add_argument("--sync", default="nosync", help="--sync of the msad started here")
    ap.add_argument("--single", type=int, default=0, help="single-hop questions (default n/50, 30..200)")
    ap.add_argument("--chains", type=int, default=0, help="two-hop chains (default = single)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kpr", type=int, default=2, help="documents per interleave round")
    ap.add_argument("--budget", type=int, default=2048, help="interleave token budget (words)")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--encoder-kw", default="",
                    help='LexicalEncoder arguments as JSON, e.g. \'{"chunk_tokens": 32, '
                         '"char_layer": true, "focus_gate": 0}\' (v1-like settings)')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tfidf", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the collections")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    fortunes = load_fortunes()
    if not fortunes:
        print("eval_memory: no fortunes in %s (apt-get install fortunes)" % FORTUNE_DIR)
        return 2
    print("haystack: %d distinct fortunes from %s" % (len(fortunes), FORTUNE_DIR), flush=True)
    d = None
    if not args.addr:
        sys.path.insert(0, HERE)
        from daemon_util import Daemon
        d = Daemon(args=["--sync", args.sync, "--backend", "cpu"]).start()
        args.addr = d.addr
        print("msad on %s (--sync %s), data in %s" % (d.addr, args.sync, d.data_dir), flush=True)
    results = []
    try:
        for n in [int(x) for x in args.sizes.split(",") if x]:
            print("-- %d documents" % n, flush=True)
            r = run_size(n, args, fortunes)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        if d:
            d.stop()
            d.cleanup()
    print()
    print(table(results, args.rounds, args.kpr))
    out = {"params": {k: v for k, v in vars(args).items() if k != "addr"}, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
