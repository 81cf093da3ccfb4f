"""Encoders: text -> the per-layer latents msad stores and routes on.

An encoder turns

  * a document into, per memory layer, pooled K, V (and router K when the schema
    routes on separate router keys), each float32 [C, H, D] with C = ceil(tokens / P);
  * a query into, per memory layer, routing_q and q, each float32 [T, Hq, D].

It also fixes the collection schema it needs (layers, heads, head dim, P, routing
rules) and has an ``identity`` string: the collection's ``model`` field is set from
it and every write and route sends it, so msad refuses latents of another encoder
(FAILED_PRECONDITION).

Two encoders:

  * :class:`LexicalEncoder` (here): a deterministic, model-free LEXICAL BASELINE. It
    hashes words, word bigrams and character trigrams into the routing space. It is
    not MSA and has no learned weights; it exists so that the memory works out of
    the box on a CPU with real text, and as a baseline.
  * :class:`msa_memory.msa_encoder.MSAEncoder`: the real thing, from a Qwen3-family or
    MSA checkpoint loaded with Hugging Face transformers (imported lazily).
"""

import hashlib
import math
import re

import numpy as np

__all__ = ["Encoder", "EncodedDoc", "EncodedQuery", "LexicalEncoder", "pool_chunks",
           "STOPWORDS"]


def pool_chunks(x, P):
    """Token rows [N, ...] -> float32 means per chunk of P tokens [ceil(N/P), ...]
    (SEMANTICS.md "Pooling"; the last chunk may be shorter)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    c = -(-n // P)
    out = np.empty((c,) + x.shape[1:], dtype=np.float32)
    for i in range(c):
        out[i] = x[i * P:(i + 1) * P].mean(axis=0, dtype=np.float32)
    return out


class EncodedDoc:
    """One document's latents: tokens (N > 0) and layers {layer: (k, v, router_k or
    None)}, pooled float32 [C, H, D]."""

    __slots__ = ("tokens", "layers")

    def __init__(self, tokens, layers):
        self.tokens = int(tokens)
        self.layers = layers

    @property
    def chunks(self):
        return next(iter(self.layers.values()))[0].shape[0]


class EncodedQuery:
    """One query's latents: layers {layer: (routing_q, q)}, float32 [T, Hq, D]."""

    __slots__ = ("tokens", "layers")

    def __init__(self, tokens, layers):
        self.tokens = int(tokens)
        self.layers = layers


class Encoder:
    """The interface. Subclasses set the attributes and implement the methods."""

    identity = ""               # the collection's `model`; different latents -> different identity
    layers = ()                 # memory layer indices, ascending
    kv_heads = 0                # H
    query_heads = 0             # Hq
    head_dim = 0                # D
    chunk_tokens = 64           # P
    separate_router_keys = False
    similarity = "cosine"
    head_reduce = "mean"
    query_reduce = "max"
    chunk_reduce = "max"
    default_top_k = 16
    kv_dtype = "bf16"
    routing_dtype = "bf16"

    def schema(self):
        """Keyword arguments of msa_client.Client.create_collection."""
        return dict(layers=list(self.layers), kv_heads=self.kv_heads,
                    query_heads=self.query_heads, head_dim=self.head_dim,
                    chunk_tokens=self.chunk_tokens, kv_dtype=self.kv_dtype,
                    routing_dtype=self.routing_dtype,
                    separate_router_keys=self.separate_router_keys,
                    similarity=self.similarity, head_reduce=self.head_reduce,
                    query_reduce=self.query_reduce, chunk_reduce=self.chunk_reduce,
                    default_top_k=self.default_top_k, model=self.identity)

    def encode_documents(self, texts):
        """list of str -> list of EncodedDoc."""
        raise NotImplementedError

    def encode_query(self, text):
        """str -> EncodedQuery."""
        raise NotImplementedError

    def count_tokens(self, text):
        """Tokens of text as this encoder counts them (for token budgets)."""
        raise NotImplementedError

    def encode_document(self, text):
        return self.encode_documents([text])[0]


# ----------------------------------------------------------------------------------
# LexicalEncoder
# ----------------------------------------------------------------------------------

# A short English stopword list: function words carry no topic and, without corpus
# statistics (no IDF), would dominate every cosine. Fixed here, not learned.
STOPWORDS = frozenset("""
a about above after again against all am an and any are aren as at be because been
before being below between both but by can cannot could couldn did didn do does doesn
doing don down during each few for from further had hadn has hasn have haven having he
her here hers herself him himself his how i if in into is isn it its itself just let
ll me more most mustn my myself no nor not now of off on once only or other ought our
ours ourselves out over own re s same shan she should shouldn so some such t than that
the their theirs them themselves then there these they this those through to too under
until up ve very was wasn we were weren what when where which while who whom why will
with won would wouldn you your yours yourself yourselves also may might must shall
one two get got us
""".split())

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Sentence boundaries: white space after . ! ?, a blank line, and a line break after
# a line that ends in . ! ? " ' ) ] or in a capitalised word (see sentences()).
_SENT = re.compile(r"(?<=[.!?])\s+")
_PARA = re.compile(r"\n\s*\n")
# A "sentence" ending in one of these abbreviations (or in a single-letter initial,
# "H.") is not one: it is joined to the next ("Dr. Dynzheis prescribed ...").
ABBREVIATIONS = frozenset("""
dr mr mrs ms mssrs st jr sr prof rev hon gen col capt cpt lt sgt cmdr adm gov sen rep
vs etc eg ie cf al approx ca inc ltd co corp dept univ no nos vol vols fig figs pp ed
eds jan feb mar apr jun jul aug sep sept oct nov dec mt ft
""".split())
_M64 = (1 << 64) - 1


def _splitmix64(x):
    """Vectorised splitmix64 finaliser on np.uint64 (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class LexicalEncoder(Encoder):
    """A deterministic, model-free lexical baseline (NOT Memory Sparse Attention).

    Tokens are words (``[^\\W_]+``). A document is cut into chunks of P words (P = 16
    by default: a planted fact inside a longer note keeps most of a chunk's weight;
    P = 32 lost single-hop recall@1 0.97 -> 0.905 at 100K fortunes); each chunk
    becomes one pooled row per layer and head:

      * layer 0 ("words"): content-word unigrams and bigrams of adjacent content
        words (weight ``bigram_weight``), stopwords dropped, lower-cased, a plural 's'
        stripped from words of 5+ letters. Without corpus statistics there is no
        IDF; two corpus-free priors stand in: longer words weigh more
        (``length_prior``: 1 + lp * (clamp(len, 3, 10) - 6) / 4, Zipf's law of
        abbreviation), and capitalised words (names) weigh ``caps_boost`` times more;
      * layer 1 ("chars", only when ``char_layer``; off by default since v2):
        character trigrams of each content word with boundary marks (``^wo``,
        ``wor``, ``ord``, ``rd$``): spelling variants and inflections still overlap.
        Measured on tests/eval_memory.py it costs recall: Memory fuses layers by the
        mean score, and trigrams of common words rank the documents that share only
        the question's common words high (two-hop interleave at 10K: 0.685 with it,
        0.875 without), at twice the bytes and routing work.

    A feature with count tf in the chunk weighs ``w * (1 + log tf)`` (sublinear tf).
    Every feature is hashed (blake2b, 64 bits) and added with a +-1 sign into one of
    D buckets of EACH of the H heads, with a different hash seed per head: each head
    is an independent sketch of the same sparse vector, so under COSINE + HEAD_MEAN
    the score is the mean of H independent estimates of the cosine of the two
    feature vectors, and hash collisions average out. Similarity: COSINE, HEAD_MEAN,
    QUERY_MAX, CHUNK_MAX; Hq = H. (Measured with tests/eval_memory.py: the exact
    sparse cosine, i.e. unlimited buckets, gives the same recall as v1's 8 x 128
    sketch at 10K and 100K fortunes (within 0.01), and v2 gains <= 0.02 from it;
    the sketch size is not what limits this baseline.)

    Queries: one row per sentence (see sentences(); P-word windows when longer);
    QUERY_MAX takes the best row. ``encode_interleave`` builds the query of a memory-interleave round
    (see there).

    V = K: a lexical sketch has nothing to attend to; V is stored so that the
    collection is a valid MSA collection and Attend works.
    """

    VERSION = 2

    def __init__(self, kv_heads=8, head_dim=128, chunk_tokens=16, char_layer=False,
                 bigram_weight=0.7, char_weight=1.0, length_prior=0.5, caps_boost=2.0,
                 focus_gate=0.9, kv_dtype="bf16",
                 routing_dtype="bf16", seed=0, default_top_k=16):
        if not (1 <= kv_heads <= 64 and 1 <= head_dim <= 256 and 1 <= chunk_tokens <= 4096):
            raise ValueError("kv_heads 1..64, head_dim 1..256, chunk_tokens 1..4096")
        self.kv_heads = self.query_heads = int(kv_heads)
        self.head_dim = int(head_dim)
        self.chunk_tokens = int(chunk_tokens)
        self.char_layer = bool(char_layer)
        self.layers = (0, 1) if self.char_layer else (0,)
        self.bigram_weight = float(bigram_weight)
        self.char_weight = float(char_weight)
        self.length_prior = float(length_prior)
        self.caps_boost = float(caps_boost)
        self.focus_gate = float(focus_gate)
        self.kv_dtype = kv_dtype
        self.routing_dtype = routing_dtype
        self.seed = int(seed)
        self.default_top_k = int(default_top_k)
        # Every parameter that changes the stored latents or the routing query is in
        # the identity (focus_gate shapes interleave queries only, but is kept there
        # so that a collection's results are reproducible from its `model`).
        self.identity = "msa_memory.LexicalEncoder/v%d:h%dd%dp%d:c%d:b%g:w%g:l%g:u%g:g%g:s%d" % (
            self.VERSION, self.kv_heads, self.head_dim, self.chunk_tokens,
            int(self.char_layer), self.bigram_weight, self.char_weight, self.length_prior,
            self.caps_boost, self.focus_gate, self.seed)
        seeds = []
        for h in range(self.kv_heads):
            d = hashlib.blake2b(b"head:%d:%d" % (self.seed, h), digest_size=8).digest()
            seeds.append(int.from_bytes(d, "little"))
        self._head_seeds = np.array(seeds, dtype=np.uint64)[:, None]       # [H, 1]
        self._head_base = (np.arange(self.kv_heads, dtype=np.int64) * self.head_dim)[:, None]
        self._hcache = {}

    # -- text -------------------------------------------------------------------------
    @staticmethod
    def words(text):
        return _WORD.findall(text.lower())

    @staticmethod
    def cased_words(text):
        return _WORD.findall(text)

    def count_tokens(self, text):
        return len(self.words(text))

    @staticmethod
    def _norm(w):
        if len(w) >= 5 and w.endswith("s") and not w.endswith("ss"):
            return w[:-1]
        return w

    def _hash(self, feat):
        h = self._hcache.get(feat)
        if h is None:
            if len(self._hcache) > 2_000_000:
                self._hcache.clear()
            h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
            self._hcache[feat] = h
        return h

    def _wlen(self, w):
        """A corpus-free rarity prior: longer words are rarer (Zipf's law of
        abbreviation). 1 + length_prior * (clamp(len, 3, 10) - 6) / 4."""
        return 1.0 + self.length_prior * (min(max(len(w), 3), 10) - 6) / 4.0

    def _features(self, words):
        """words (original case) -> {layer: (hashes uint64 [n], weights float64 [n])}
        for one chunk."""
        content, caps = [], set()
        for w in words:
            lw = w.lower()
            if lw in STOPWORDS:
                continue
            n = self._norm(lw)
            content.append(n)
            if w[:1].isupper() and not w.isupper():
                caps.add(n)
        f0 = {}
        for w in content:
            f0["w:" + w] = f0.get("w:" + w, 0) + 1
        for a, b in zip(content, content[1:]):
            k = "b:" + a + " " + b
            f0[k] = f0.get(k, 0) + 1
        bw = self.bigram_weight
        cb = self.caps_boost

        def wt(k):
            if k[0] == "b":
                return bw
            return self._wlen(k[2:]) * (cb if k[2:] in caps else 1.0)
        out = {0: self._weigh(f0, wt)}
        if self.char_layer:
            f1 = {}
            for w in content:
                m = "^" + w + "$"
                for i in range(len(m) - 2):
                    k = "c:" + m[i:i + 3]
                    f1[k] = f1.get(k, 0) + 1
            out[1] = self._weigh(f1, lambda k: self.char_weight)
        return out

    def _weigh(self, counts, wfn):
        if not counts:
            return np.zeros(0, np.uint64), np.zeros(0, np.float64)
        keys = list(counts)
        hs = np.fromiter((self._hash(k) for k in keys), dtype=np.uint64, count=len(keys))
        ws = np.fromiter((wfn(k) * (1.0 + math.log(counts[k])) for k in keys),
                         dtype=np.float64, count=len(keys))
        return hs, ws

    def _sketch(self, hs, ws):
        """Feature hashes + weights -> float32 [H, D]: per head, bucket and sign from
        splitmix64(hash ^ head seed)."""
        H, D = self.kv_heads, self.head_dim
        if hs.size == 0:
            return np.zeros((H, D), np.float32)
        x = _splitmix64(hs[None, :] ^ self._head_seeds)                    # [H, n]
        bucket = (x % np.uint64(D)).astype(np.int64) + self._head_base     # [H, n]
        sign = np.where((x >> np.uint64(63)) == 1, -1.0, 1.0)
        v = np.bincount(bucket.ravel(), weights=(sign * ws[None, :]).ravel(), minlength=H * D)
        return v.reshape(H, D).astype(np.float32)

    def _rows(self, word_windows):
        """list of word lists -> {layer: float32 [len, H, D]}."""
        out = {l: np.zeros((len(word_windows), self.kv_heads, self.head_dim), np.float32)
               for l in self.layers}
        for i, ws in enumerate(word_windows):
            for l, (h, w) in self._features(ws).items():
                out[l][i] = self._sketch(h, w)
        return out

    # -- the interface ----------------------------------------------------------------
    def encode_documents(self, texts):
        docs = []
        P = self.chunk_tokens
        for text in texts:
            ws = self.cased_words(text)
            n = max(1, len(ws))
            chunks = [ws[i:i + P] for i in range(0, n, P)]
            rows = self._rows(chunks)
            docs.append(EncodedDoc(n, {l: (k, k, None) for l, k in rows.items()}))
        return docs

    @staticmethod
    def sentences(text):
        """Sentences: split after . ! ? followed by white space and at blank lines; a
        line break ends a sentence when the line ends in . ! ? " ' ) ] or in a
        capitalised word ("-- Warren H. Goldsmith" then "The Kerbax orchestra ..."
        are two), while prose wrapped mid-sentence ("entrusted to" / "Theith Vreil.")
        stays one. A piece ending in an abbreviation (ABBREVIATIONS: "Dr.", "e.g.")
        or a one-letter initial ("H.") is joined to the next one."""
        out, carry = [], ""
        for para in _PARA.split(text):
            units, cur = [], []
            for line in para.split("\n"):
                if not line.strip():
                    continue
                cur.append(line.strip())
                ws = _WORD.findall(line)
                if line.rstrip()[-1:] in ".!?\"')]" or (ws and ws[-1][:1].isupper()):
                    units.append(" ".join(cur))
                    cur = []
            if cur:
                units.append(" ".join(cur))
            for u in units:
                for piece in _SENT.split(u):
                    if not piece.strip():
                        continue
                    piece = carry + piece
                    ws = _WORD.findall(piece[-12:].lower())
                    last = ws[-1] if ws else ""
                    if piece.rstrip().endswith(".") and (last in ABBREVIATIONS or
                                                         (len(last) == 1 and last.isalpha())):
                        carry = piece + " "
                        continue
                    out.append(piece)
                    carry = ""
        if carry.strip():
            out.append(carry)
        return out

    def query_windows(self, text):
        """The word windows that become the query's T rows: one per sentence (cut
        into P-word windows when longer)."""
        P = self.chunk_tokens
        wins = []
        for sent in self.sentences(text):
            ws = self.cased_words(sent)
            wins.extend(ws[i:i + P] for i in range(0, len(ws), P))
        return wins or [[]]

    def encode_interleave(self, question, evidence, relevance=None):
        """The query of a memory-interleave round (MSA routes on the whole context;
        this is the lexical stand-in). Rows: the question's sentences, then for each
        piece of evidence, in reading order, its FOCUS sentence -- the one sharing
        the most (length-weighted) content words with what was known before it
        (the question and the earlier focus sentences), i.e. the sentence that made
        it relevant -- with those known words left out. What remains is what the
        evidence adds (e.g. the name that bridges to the next hop), so the next
        round routes on that instead of re-finding documents that share the
        question's words or the evidence's unrelated sentences. Evidence sharing
        nothing with what was known contributes all its sentences.

        relevance (optional, one float per evidence text; Memory.interleave passes the
        note's routing score divided by the best score of the round that read it):
        evidence below ``focus_gate`` contributes no rows. Reading k notes per round
        brings in runners-up that matched the query weakly; their focus rows would
        otherwise route the next round to their own near-duplicates (measured: at
        100K fortunes, two-hop evidence recall 0.005 without the gate, 0.6+ with
        it)."""
        wins = self.interleave_windows(question, evidence, relevance)
        rows = self._rows(wins)
        return EncodedQuery(sum(len(w) for w in wins) or 1,
                            {l: (q, q) for l, q in rows.items()})

    def interleave_windows(self, question, evidence, relevance=None):
        """The word windows (original case) of encode_interleave's rows."""
        if relevance is not None:
            if len(relevance) != len(evidence):
                raise ValueError("relevance: one value per evidence text")
            evidence = [e for e, r in zip(evidence, relevance) if r >= self.focus_gate]
        P = self.chunk_tokens
        qwins = self.query_windows(question)
        known = {self._norm(w.lower()) for win in qwins for w in win
                 if w.lower() not in STOPWORDS}
        wins = [w for w in qwins if w]
        for text in evidence:
            sents = [self.cased_words(x) for x in self.sentences(text)]
            best, focus = 0.0, []
            for ws in sents:
                ov = sum(self._wlen(c) for c in {self._norm(w.lower()) for w in ws
                                                 if w.lower() not in STOPWORDS} & known)
                if ov > best + 1e-9:
                    best, focus = ov, [ws]
                elif ov > 0 and abs(ov - best) <= 1e-9:
                    focus.append(ws)
            if not focus:
                focus = sents
            for ws in focus:
                new = [w for w in ws if self._norm(w.lower()) not in known]
                wins.extend(new[i:i + P] for i in range(0, len(new), P))
            for ws in focus:
                known.update(self._norm(w.lower()) for w in ws if w.lower() not in STOPWORDS)
        return wins or [[]]

    def encode_query(self, text):
        wins = self.query_windows(text)
        rows = self._rows(wins)
        return EncodedQuery(sum(len(w) for w in wins) or 1,
                            {l: (q, q) for l, q in rows.items()})
