"""Externally computed embeddings in msad: the shared layer under the LangChain and
LlamaIndex stores.

Those frameworks embed text themselves (any dimension) and name documents with
strings. Here:

  * one document = one routing row (the frameworks split text themselves):
    ``chunk_tokens`` = 1 and ``tokens`` = 1 in the wire's pooled-write contract
    (C = ceil(1 / 1) = 1 row);
  * a vector of any dimension ``dim`` is L2-normalised and stored as H heads x D
    (H = ceil(dim / 256), D = ceil(dim / H), zero padding), similarity DOT +
    HEAD_MEAN with the query multiplied by H: msad's score IS the cosine
    similarity (zero vectors score 0);
  * string ids map to msad's 63-bit ids by blake2b (64 bits, top bit cleared,
    0 -> 1); the string is kept in the stored metadata, so a lookup checks it (a
    hash collision is detected, not silently merged);
  * metadata: stored as UTF-8 JSON ``{"id": <string id>, "m": <the framework's
    metadata dict>}`` (the wire stores bytes).

No metadata filters: msad's Route cannot filter yet (issue 13, deliverable 3);
the stores refuse a filter argument instead of filtering results afterwards.
"""

import hashlib
import math

import grpc
import numpy as np

from msa_client import MsaError
from msa_client import memory_pb2 as pb

from .encoders import EncodedDoc, EncodedQuery, Encoder
from .memory import Memory

__all__ = ["VectorEncoder", "VectorMemory", "string_id", "geometry"]

ID_MASK = (1 << 63) - 1


def string_id(s):
    """A framework's string id -> msad id (1 .. 2^63-1)."""
    h = int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "little")
    return (h & ID_MASK) or 1


def geometry(dim):
    """(H, D) for a dim-dimensional vector: H = ceil(dim / 256), D = ceil(dim / H)."""
    if dim < 1:
        raise ValueError("dim must be >= 1")
    H = -(-dim // 256)
    return H, -(-dim // H)


class VectorEncoder(Encoder):
    """Vectors -> routing rows (see the module doc). embed_documents(texts) and
    embed_query(text), when given, let Memory's text methods work too."""

    def __init__(self, dim, identity, embed_documents=None, embed_query=None,
                 kv_dtype="f32", routing_dtype="f32"):
        self.dim = int(dim)
        self.kv_heads, self.head_dim = geometry(self.dim)
        self.query_heads = self.kv_heads
        self.layers = (0,)
        self.chunk_tokens = 1
        self.similarity = "dot"
        self.head_reduce, self.query_reduce, self.chunk_reduce = "mean", "max", "max"
        self.kv_dtype, self.routing_dtype = kv_dtype, routing_dtype
        self.identity = identity
        self._embed_documents = embed_documents
        self._embed_query = embed_query

    def _rows(self, vecs):
        v = np.asarray(vecs, np.float64).reshape(-1, self.dim)
        if not np.all(np.isfinite(v)):
            raise ValueError("embedding: NaN or infinite value")
        n = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.divide(v, n, out=np.zeros_like(v), where=n > 0)
        pad = self.kv_heads * self.head_dim - self.dim
        if pad:
            v = np.concatenate([v, np.zeros((v.shape[0], pad))], axis=1)
        return v.astype(np.float32).reshape(-1, self.kv_heads, self.head_dim)

    def encode_vectors(self, vecs):
        rows = self._rows(vecs)
        return [EncodedDoc(1, {0: (r[None], r[None], None)}) for r in rows]

    def encode_vector_query(self, vec):
        q = self._rows([vec]) * np.float32(self.kv_heads)
        return EncodedQuery(1, {0: (q, q)})

    def count_tokens(self, text):
        return len(text.split())

    def encode_documents(self, texts):
        if self._embed_documents is None:
            raise ValueError("this VectorEncoder has no embedding function")
        return self.encode_vectors(self._embed_documents(list(texts)))

    def encode_query(self, text):
        if self._embed_query is None:
            raise ValueError("this VectorEncoder has no embedding function")
        return self.encode_vector_query(self._embed_query(text))


class VectorMemory(Memory):
    """Memory over a VectorEncoder with string ids and dict metadata."""

    def upsert(self, sids, texts, vectors, metadatas):
        """Inserts or replaces documents by string id, one transaction."""
        encs = self.encoder.encode_vectors(vectors)
        docs = [self._doc(string_id(s), t, {"id": s, "m": m}, e)
                for s, t, m, e in zip(sids, texts, metadatas, encs)]
        if docs:
            self._write_docs(docs, expect_absent=False)

    @staticmethod
    def _unwrap(sid_expected, meta):
        if not isinstance(meta, dict) or "id" not in meta:
            return None
        if sid_expected is not None and meta["id"] != sid_expected:
            return None                       # a 64-bit hash collision: not this document
        return meta["id"], meta.get("m")

    def get_many(self, sids):
        """[(sid, text, metadata)] of the ids that exist, in the order asked."""
        out = []
        want = [(s, string_id(s)) for s in sids]
        got = self._texts([i for _, i in want])
        for s, i in want:
            if i in got:
                u = self._unwrap(s, got[i][1])
                if u is not None:
                    out.append((u[0], got[i][0], u[1]))
        return out

    def delete_many(self, sids):
        """Deletes the ids that exist (missing ones are ignored); one write per id,
        since msad fails a whole write on a missing id."""
        n = 0
        for s in sids:
            try:
                self.delete(string_id(s))
                n += 1
            except KeyError:
                pass
        return n

    def search_vector(self, vec, k):
        """[(sid, score, text, metadata)] best first; score = cosine."""
        if k < 1:
            return []
        q = self.encoder.encode_vector_query(vec)
        ranked, _ = self.route(None, k, encoded=q)
        texts = self._texts([i for i, _ in ranked])
        out = []
        for i, s in ranked:
            if i in texts:
                u = self._unwrap(None, texts[i][1])
                if u is not None:
                    out.append((u[0], s, texts[i][0], u[1]))
        return out

    def iter_all(self, page=1000):
        """Every (sid, text, metadata), in msad id order."""
        after = 0
        while True:
            notes, after = self.list(after_id=after, limit=page)
            for n in notes:
                u = self._unwrap(None, n["metadata"])
                if u is not None:
                    yield u[0], n["text"], u[1]
            if not after:
                return

    def clear(self):
        """Deletes every document (List, then deletes in batches)."""
        after = 0
        while True:
            docs, after = self.client.list_docs(self.collection, after_id=after, limit=1000)
            ids = [d["id"] for d in docs]
            for s in range(0, len(ids), 256):
                ops = [pb.WriteOp(delete_id=int(i)) for i in ids[s:s + 256]]
                try:
                    r = self.client.write(self.collection, ops, model=self.model)
                    self._seen(r.commit_seq)
                except MsaError as e:            # one was deleted meanwhile: one by one
                    if e.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    for i in ids[s:s + 256]:
                        try:
                            self.delete(i)
                        except KeyError:
                            pass
            if not after:
                return


def open_vector_memory(addr, collection, dim, identity, client=None, token=None,
                       create=True, embed_documents=None, embed_query=None, **kw):
    enc = VectorEncoder(dim, identity, embed_documents, embed_query)
    return VectorMemory(addr, collection, enc, token=token, create=create, client=client,
                        fusion="mean", **kw)


def relevance(score):
    """cosine in [-1, 1] -> relevance in [0, 1]."""
    return max(0.0, min(1.0, (1.0 + float(score)) / 2.0)) if math.isfinite(score) else 0.0
