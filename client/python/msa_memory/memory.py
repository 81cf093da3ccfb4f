"""Agent long-term memory over msad: add / update / delete / get / search, and
MSA's Memory Interleave (multi-round recall).

    from msa_memory import Memory, LexicalEncoder
    mem = Memory("127.0.0.1:7420", "notes", LexicalEncoder())
    i = mem.add("The spare key is under the blue flower pot.", {"tag": "home"})
    for hit in mem.search("where is the spare key?", k=3):
        print(hit.id, hit.score, hit.text)
    res = mem.interleave("where is the spare key?", max_rounds=3, k_per_round=2)

Design (README "Agent memory" says the same):

* Ids are random 63-bit integers (1 .. 2^63-1) from the OS CSPRNG, written with
  ``expect_absent``; on the (astronomically rare) ALREADY_EXISTS the whole batch --
  which msad rolled back -- is retried with fresh ids. No counter, so any number of
  processes can add to one collection without coordinating, and an id never
  resurrects a deleted note of someone else.
* The collection's ``model`` is the encoder's identity; every Write and Route sends
  ``model=identity``, so msad refuses latents of another encoder with
  FAILED_PRECONDITION. Opening an existing collection also checks it client-side.
* Search: one Route with every memory layer (each routed independently by msad,
  ``depth`` candidates per layer), then layer fusion here: the fused score of a
  document is the MEAN over layers of its per-layer score; a document absent from a
  layer's candidate list gets that layer's lowest returned score (an upper bound of
  its true score there; it only affects documents outside some layer's top-depth).
  Ties by smaller id, like msad. ``fusion="rrf"`` uses reciprocal-rank fusion
  (sum over layers of 1 / (60 + rank)) instead; left out, the encoder's ``fusion``
  attribute decides (HybridEncoder: rrf), else mean.
* Reads pass ``min_seq`` = the last commit this Memory wrote, so a search sees the
  notes this process just added (read-your-writes) even with other clients writing.
* Metadata: any JSON value, stored as UTF-8 JSON (bytes are stored as they are and
  come back as bytes).
"""

import inspect
import json
import secrets
import time
from collections import namedtuple

import grpc

from msa_client import Client, MsaError
from msa_client import memory_pb2 as pb

__all__ = ["Memory", "Hit", "InterleaveResult", "MemoryError_", "ModelMismatch"]

Hit = namedtuple("Hit", "id score text metadata")
Hit.__doc__ = "One search result: (id, score, text, metadata)."


class InterleaveResult:
    """evidence: list of Hit in the order read; trace: one dict per round
    {round, query_tokens, candidates: [(id, score)], read: [ids], skipped: [ids],
    tokens_used}; stop: why it stopped ('rounds', 'budget', 'threshold', 'exhausted')."""

    def __init__(self, question, evidence, trace, stop):
        self.question = question
        self.evidence = evidence
        self.trace = trace
        self.stop = stop

    @property
    def ids(self):
        return [h.id for h in self.evidence]

    def context(self):
        """The question with the evidence appended, as the last round routed it."""
        return "\n\n".join([self.question] + [h.text for h in self.evidence])

    def __repr__(self):
        return "InterleaveResult(ids=%s, rounds=%d, stop=%r)" % (self.ids, len(self.trace), self.stop)


class MemoryError_(Exception):
    """Base of this module's errors."""


class ModelMismatch(MemoryError_):
    """The collection was created for another encoder (or another schema)."""


ID_MAX = (1 << 63) - 1


def _new_id():
    while True:
        i = secrets.randbits(63)
        if i:
            return i


def _enc_meta(m):
    if m is None:
        return b""
    if isinstance(m, (bytes, bytearray)):
        return bytes(m)
    return json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode()


def _dec_meta(b):
    if not b:
        return None
    try:
        return json.loads(b.decode())
    except (UnicodeDecodeError, ValueError):
        return bytes(b)


class Memory:
    """An agent memory: one msad collection written and read through one encoder.

    addr: msad address ("host:port" / "unix:/path"); collection: its name; encoder: an
    msa_memory Encoder; token: bearer token; create: create the collection when it
    is missing (needs an admin token when auth is on). client_kw: more
    msa_client.Client arguments (tls, timeout, ...). kv_dtype / routing_dtype
    override the encoder's storage dtypes when the collection is created.
    """

    def __init__(self, addr, collection, encoder, token=None, create=True, client=None,
                 depth=None, fusion=None, kv_dtype=None, routing_dtype=None, **client_kw):
        self.encoder = encoder
        self.collection = collection
        self.model = encoder.identity
        self.client = client or Client(addr, token=token, **client_kw)
        self._own_client = client is None
        self.depth = depth
        if fusion is None:                 # the encoder's preference (HybridEncoder: rrf)
            fusion = getattr(encoder, "fusion", "mean")
        if fusion not in ("mean", "rrf"):
            raise ValueError("fusion: 'mean' or 'rrf'")
        self.fusion = fusion
        self.last_seq = 0
        want = encoder.schema()
        if kv_dtype:
            want["kv_dtype"] = kv_dtype
        if routing_dtype:
            want["routing_dtype"] = routing_dtype
        try:
            info = self.client.describe(collection)
        except MsaError as e:
            if e.code != grpc.StatusCode.NOT_FOUND or not create:
                raise
            try:
                info = self.client.create_collection(collection, **want)
            except MsaError as e2:
                if e2.code != grpc.StatusCode.ALREADY_EXISTS:   # lost a race: fine
                    raise
                info = self.client.describe(collection)
        self.info = info
        self._check_schema(info["schema"], want)

    def _check_schema(self, s, want):
        if s["model"] != self.model:
            raise ModelMismatch("collection %r holds latents of model %r, this encoder is %r"
                                % (self.collection, s["model"], self.model))
        for k in ("layers", "kv_heads", "query_heads", "head_dim", "chunk_tokens",
                  "separate_router_keys"):
            if s[k] != want[k]:
                raise ModelMismatch("collection %r: %s is %r, encoder needs %r"
                                    % (self.collection, k, s[k], want[k]))

    # -- plumbing --------------------------------------------------------------------
    def close(self):
        if self._own_client:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _seen(self, seq):
        if seq > self.last_seq:
            self.last_seq = seq

    def _doc(self, id, text, meta, enc):
        layers = {}
        for l, (k, v, rk) in enc.layers.items():
            layers[l] = (k, v, rk) if self.encoder.separate_router_keys else (k, v)
        return self.client.document(self.collection, id, layers, tokens=enc.tokens, text=text,
                                    metadata=_enc_meta(meta))

    # -- writes ------------------------------------------------------------------------
    def add(self, text, metadata=None, id=None):
        """Stores a note; returns its id (random 63-bit unless id is given)."""
        return self.add_many([text], None if metadata is None else [metadata],
                             ids=None if id is None else [id])[0]

    def add_many(self, texts, metadatas=None, batch=256, ids=None, max_batch_bytes=None):
        """Stores notes, one Write (one transaction) per `batch` notes (fewer when a
        batch would pass the message limit). Returns their ids in order. A failing
        batch raises; the batches before it stay written."""
        texts = list(texts)
        if metadatas is None:
            metadatas = [None] * len(texts)
        metadatas = list(metadatas)
        if len(metadatas) != len(texts) or (ids is not None and len(ids) != len(texts)):
            raise ValueError("texts, metadatas and ids differ in length")
        limit = max_batch_bytes or (self.client.max_message_bytes - (256 << 10))
        out = []
        for s in range(0, len(texts), max(1, int(batch))):
            tb = texts[s:s + batch]
            encs = self.encoder.encode_documents(tb)
            fixed = ids is not None
            bid = [int(i) for i in ids[s:s + batch]] if fixed else [_new_id() for _ in tb]
            for attempt in range(8):
                docs = [self._doc(i, t, m, e) for i, t, m, e in
                        zip(bid, tb, metadatas[s:s + batch], encs)]
                try:
                    self._write_docs(docs, expect_absent=not fixed, limit=limit)
                    break
                except MsaError as e:
                    if fixed or e.code != grpc.StatusCode.ALREADY_EXISTS or attempt == 7:
                        raise
                    bid = [_new_id() for _ in tb]    # the batch was rolled back: new ids
            out.extend(bid)
        return out

    def _write_docs(self, docs, expect_absent, limit=None):
        """One request if it fits the message limit, else split (atomic per piece)."""
        limit = limit or (self.client.max_message_bytes - (256 << 10))
        ops = [pb.WriteOp(put=d, expect_absent=expect_absent) for d in docs]
        size = sum(o.ByteSize() + 8 for o in ops)
        if size <= limit or len(ops) == 1:
            r = self.client.write(self.collection, ops, model=self.model)
            self._seen(r.commit_seq)
            return
        half = len(docs) // 2
        self._write_docs(docs[:half], expect_absent, limit)
        self._write_docs(docs[half:], expect_absent, limit)

    def update(self, id, text, metadata=...):
        """Replaces a note's text (and metadata, unless left out: then it is kept).
        Compare-and-set on the version read; raises KeyError when the id is missing.
        Returns the new version."""
        for attempt in range(5):
            cur = self._get_raw([id])[0]
            meta = _dec_meta(cur.document.metadata) if metadata is ... else metadata
            enc = self.encoder.encode_documents([text])[0]
            doc = self._doc(int(id), text, meta, enc)
            op = pb.WriteOp(put=doc, expect_version=cur.info.version)
            try:
                r = self.client.write(self.collection, [op], model=self.model)
            except MsaError as e:
                if e.code == grpc.StatusCode.FAILED_PRECONDITION and attempt < 4 and \
                        "version" in (e.details or "").lower():
                    continue                       # a concurrent update: read again
                raise
            self._seen(r.commit_seq)
            return r.versions[0]
        raise MemoryError_("update of %d: too many concurrent updates" % id)

    def delete(self, id):
        """Forgets a note; raises KeyError when it does not exist."""
        try:
            r = self.client.write(self.collection, [pb.WriteOp(delete_id=int(id))],
                                  model=self.model)
        except MsaError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                raise KeyError(id) from e      # __cause__: msad's own error
            raise
        self._seen(r.commit_seq)

    # -- reads -------------------------------------------------------------------------
    def _get_raw(self, ids):
        try:
            r = self.client._call(self.client._mem.Get, pb.GetRequest(
                collection=self.collection, ids=[int(i) for i in ids], with_text=True,
                with_metadata=True, min_seq=self.last_seq))
        except MsaError as e:
            if e.code == grpc.StatusCode.NOT_FOUND and len(ids) == 1:
                raise KeyError(ids[0]) from e
            raise
        return list(r.records)

    def get(self, id):
        """The note as a dict {id, text, metadata, version, tokens, updated_unix_ms};
        KeyError when missing."""
        rec = self._get_raw([id])[0]
        return {"id": rec.info.id, "text": rec.document.text,
                "metadata": _dec_meta(rec.document.metadata), "version": rec.info.version,
                "tokens": rec.info.tokens, "updated_unix_ms": rec.info.updated_unix_ms}

    def list(self, after_id=0, limit=100):
        """One page of notes in id order: (notes, next_after_id), notes as get()
        returns them, next_after_id 0 when there is no more (List, then Get)."""
        page = self.client.list_docs(self.collection, after_id=int(after_id),
                                     limit=max(1, min(int(limit), 1000)))
        docs, nxt = page
        if not docs:
            return [], 0
        recs = self._texts_full([d["id"] for d in docs])
        return recs, nxt

    def _texts_full(self, ids):
        try:
            recs = self._get_raw(ids)
        except (KeyError, MsaError) as e:         # one was deleted meanwhile: one by one
            if isinstance(e, MsaError) and e.code != grpc.StatusCode.NOT_FOUND:
                raise
            out = []
            for i in ids:
                try:
                    out.append(self.get(i))
                except KeyError:
                    continue
            return out
        return [{"id": r.info.id, "text": r.document.text,
                 "metadata": _dec_meta(r.document.metadata), "version": r.info.version,
                 "tokens": r.info.tokens, "updated_unix_ms": r.info.updated_unix_ms}
                for r in recs]

    def __len__(self):
        return self.client.describe(self.collection)["documents"]

    def _texts(self, ids):
        """{id: (text, metadata)} for ids still present (a note deleted between the
        route and this read is left out)."""
        if not ids:
            return {}
        try:
            recs = self._get_raw(ids)
        except (KeyError, MsaError) as e:
            if isinstance(e, MsaError) and e.code != grpc.StatusCode.NOT_FOUND:
                raise
            out = {}
            for i in ids:
                try:
                    rec = self._get_raw([i])[0]
                except KeyError:
                    continue
                out[i] = (rec.document.text, _dec_meta(rec.document.metadata))
            return out
        return {r.info.id: (r.document.text, _dec_meta(r.document.metadata)) for r in recs}

    def route(self, query, k=10, exclude_ids=(), depth=None, encoded=None):
        """Fused ranking without the text: [(id, score)], best first (see the module
        doc for the fusion rule), and the per-layer answers {layer: (ids, scores)}."""
        q = encoded or self.encoder.encode_query(query)
        d = depth or self.depth or min(1024, max(4 * k, 32))
        d = max(d, k)
        res = self.client.route(self.collection, {l: rq for l, (rq, _q) in q.layers.items()},
                                top_k=d, exclude_ids=list(exclude_ids), min_seq=self.last_seq,
                                model=self.model)
        per_layer = {l: ([int(i) for i in ids], [float(s) for s in sc])
                     for l, (ids, sc) in res.items()}
        return fuse(per_layer, k, self.fusion, depth=d), per_layer

    def search(self, query, k=10, exclude_ids=()):
        """The k best notes for query: [Hit(id, score, text, metadata)], best first."""
        ranked, _ = self.route(query, k, exclude_ids)
        texts = self._texts([i for i, _ in ranked])
        return [Hit(i, s, *texts[i]) for i, s in ranked if i in texts]

    def _interleave_query(self, question, evidence, relevance=None):
        """The routing query of an interleave round. An encoder may define
        encode_interleave(question, evidence_texts[, relevance]) (LexicalEncoder
        does); relevance, one float per evidence text, is the note's score divided by
        the best score of the round that read it (1.0 for a round's top note), passed
        when the method takes a `relevance` argument. Otherwise the question and the
        evidence are joined with blank lines and encoded as one query, as a model
        would read them in its context."""
        f = getattr(self.encoder, "encode_interleave", None)
        if f is not None:
            try:
                takes = "relevance" in inspect.signature(f).parameters
            except (TypeError, ValueError):
                takes = False
            if takes and relevance is not None:
                return f(question, evidence, relevance=relevance)
            return f(question, evidence)
        return self.encoder.encode_query("\n\n".join([question] + list(evidence)))

    def interleave(self, question, max_rounds=3, k_per_round=2, token_budget=1024,
                   threshold=0.05):
        """MSA's Memory Interleave as a retrieval loop: route the question; read the
        selected notes' original text (Get); append it to the query; route again
        excluding every note already read; stop when max_rounds rounds ran, the
        token budget (tokens of evidence, as the encoder counts them) is used up, or
        no unread note scores >= threshold. A selected note that would overflow the
        budget is skipped (and excluded from later rounds). Each evidence note's
        relevance (its score / the best score of its round) goes to the encoder's
        encode_interleave when it takes one (LexicalEncoder drops weak runners-up
        from the query, see its focus_gate). Returns an
        InterleaveResult (evidence in reading order, per-round trace, stop reason)."""
        evidence, trace, relevance = [], [], []
        read, excluded = [], []
        used = 0
        stop = "rounds"
        for rnd in range(max_rounds):
            t0 = time.monotonic()
            q = self._interleave_query(question, [h.text for h in evidence], relevance)
            ranked, _ = self.route(None, k_per_round, exclude_ids=excluded, encoded=q)
            cands = [(i, s) for i, s in ranked if s >= threshold]
            step = {"round": rnd + 1, "query_tokens": q.tokens,
                    "candidates": [(i, round(s, 6)) for i, s in ranked],
                    "read": [], "skipped": [], "tokens_used": used}
            trace.append(step)
            if not cands:
                stop = "threshold" if ranked else "exhausted"
                break
            texts = self._texts([i for i, _ in cands])
            best = cands[0][1]
            for i, s in cands:
                excluded.append(i)
                if i not in texts:
                    continue
                text, meta = texts[i]
                n = self.encoder.count_tokens(text)
                if used + n > token_budget:
                    step["skipped"].append(i)
                    continue
                used += n
                read.append(i)
                step["read"].append(i)
                evidence.append(Hit(i, s, text, meta))
                relevance.append(s / best if best > 0 else 1.0)
            step["tokens_used"] = used
            step["ms"] = round(1000 * (time.monotonic() - t0), 2)
            if used >= token_budget:
                stop = "budget"
                break
            # A round that only skipped (too long) notes goes on: they are excluded
            # now, so the next round offers the next candidates of the same query.
        return InterleaveResult(question, evidence, trace, stop)


def fuse(per_layer, k, fusion="mean", depth=None):
    """Layer fusion: per_layer {layer: (ids, scores)} best first -> [(id, score)] top k.

    mean: score(d) = mean over layers of s_l(d); when d is not in layer l's list,
          s_l(d) = the lowest score layer l returned (its list is the top `depth`).
    rrf:  score(d) = sum over layers of 1 / (60 + rank_l(d)), rank from 1; absent ->
          rank = len(list) + 1.
    Ties by smaller id."""
    layers = sorted(per_layer)
    if not layers:
        return []
    cand = set()
    for l in layers:
        cand.update(per_layer[l][0])
    tot = dict.fromkeys(cand, 0.0)
    for l in layers:
        ids, sc = per_layer[l]
        if fusion == "rrf":
            pos = {i: r for r, i in enumerate(ids, 1)}
            miss = len(ids) + 1
            for d in cand:
                tot[d] += 1.0 / (60 + pos.get(d, miss))
        else:
            m = dict(zip(ids, sc))
            floor = sc[-1] if sc else 0.0
            for d in cand:
                tot[d] += m.get(d, floor)
    if fusion != "rrf":
        for d in cand:
            tot[d] /= len(layers)
    return sorted(tot.items(), key=lambda p: (-p[1], p[0]))[:k]
