"""MsadMemoryClient: msad as the memory of an MSA model.

Implements the memory-client protocol of the MSA reference's attention layers
(``get_template_prefix_kvcaches``, ``doc_query``) over msad, plus ``doc_attend``
(attend mode: routing and attention at the store, merged by log-sum-exp in the
layer). One client, two strategies:

* ``mode="fetch"``: per router layer one Route (top-k documents) and one Get of the
  selected documents' pooled K/V for that layer; the layer attends itself.
* ``mode="attend"``: per router layer one Attend (routing + attention over the
  selected documents at msad, returning out and lse); decode steps send Attend with
  the prefill's ``doc_ids``.

Consistency: ``with client.pinned():`` makes every call inside read ONE snapshot.
The first call asks msad to hold the snapshot it read (``hold_snapshot_ms``); later
calls read at that ``snapshot_seq`` (renewing the lease); leaving the block releases
it. So all layers of a prefill, and the decode steps after it, see the same document
versions while other clients write. ``MSAModel.generate`` pins for you.

Storage layout in msad (a convention of this client, not of the daemon):
* collection ``NAME``: schema from the model (memory layers, heads, head_dim, P,
  separate router keys, COSINE for INFONCE routers, the reductions, default top_k),
  ``model`` = the model identity, so latents of another checkpoint are refused;
* collection ``NAME.template``: document 1 holds the K/V of the chat-template prefix
  for EVERY decoder layer, one row per token (chunk_tokens = 1).
"""

import json
import threading
from contextlib import contextmanager

import numpy as np
import torch

from msa_client import Client, MsaError
from msa_client import memory_pb2 as pb
from msa_client.client import _from_tensor, _to_tensor

__all__ = ["MsadMemoryClient", "MemoryUnavailable", "model_identity", "TEMPLATE_DOC_ID"]

TEMPLATE_DOC_ID = 1
_DT = {"f32": pb.F32, "f16": pb.F16, "bf16": pb.BF16, "i8": pb.I8}
_SIM = {"cosine": pb.COSINE, "dot": pb.DOT}
_HEAD = {"mean": pb.HEAD_MEAN, "max": pb.HEAD_MAX}
_QUERY = {"max": pb.QUERY_MAX, "mean": pb.QUERY_MEAN, "last": pb.QUERY_LAST}
_CHUNK = {"max": pb.CHUNK_MAX, "mean": pb.CHUNK_MEAN}


class MemoryUnavailable(RuntimeError):
    """msad could not answer a memory call (gone, deadline, refused): generation
    stops here rather than continue without its memory."""


def model_identity(model):
    s = model.settings
    return "%s:layers=%s:P=%d:router=%s:H=%d:Hq=%d:D=%d" % (
        model.name, ",".join(map(str, s.layers)), s.chunk_tokens,
        "r" if s.decouple_router else "k", model.kv_heads, model.query_heads, model.head_dim)


def _has_field(msg, name):
    return name in msg.DESCRIPTOR.fields_by_name


class MsadMemoryClient:
    """client: an msa_client.Client or an address. model: the MSAModel whose memory
    this is (its shape is checked against the collection). top_k: 0 = the
    collection's default. hold_ms: lease of a pinned snapshot, renewed on every call.
    """

    def __init__(self, client, collection, model, mode="fetch", top_k=0, hold_ms=30000,
                 timeout=60.0):
        if mode not in ("fetch", "attend"):
            raise ValueError("mode: %r, want 'fetch' or 'attend'" % (mode,))
        self.client = client if isinstance(client, Client) else Client(client, timeout=timeout)
        self.collection = collection
        self.template_collection = collection + ".template"
        self.model = model
        self.mode = mode
        self.top_k = int(top_k)
        self.hold_ms = int(hold_ms)
        self.timeout = timeout
        self.identity = model_identity(model)
        self._lock = threading.Lock()
        self._seq = 0            # pinned snapshot (0 = none)
        self._pin_depth = 0
        self._template = None    # (seq it was read at, {layer: (k, v)}, tokens)
        self.wire = {"calls": 0, "sent": 0, "received": 0}
        self._can_pin = _has_field(pb.RouteRequest, "hold_snapshot_ms")

    # -- plumbing ----------------------------------------------------------------------
    def _call(self, method, req, what):
        fn = getattr(self.client._mem, method)
        if self._pin_depth and self._can_pin:
            if self._seq:
                req.snapshot_seq = self._seq
            req.hold_snapshot_ms = self.hold_ms
        try:
            resp = self.client._call(fn, req, self.timeout)
        except MsaError as e:
            if e.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN"):
                raise MemoryUnavailable("msad at %s did not answer %s (%s): %s" % (
                    self.client.addr, what, e.name, e.details)) from None
            if e.name == "FAILED_PRECONDITION" and self._seq and "snapshot" in (e.details or ""):
                raise MemoryUnavailable("%s: the pinned snapshot %d is gone (%s)" % (
                    what, self._seq, e.details)) from None
            raise
        self.wire["calls"] += 1
        self.wire["sent"] += req.ByteSize()
        self.wire["received"] += resp.ByteSize()
        if self._pin_depth and self._can_pin and not self._seq:
            self._seq = int(resp.snapshot_seq)
        return resp

    @contextmanager
    def pinned(self):
        """Every call inside reads one snapshot (held by msad for hold_ms after each
        call, released on exit)."""
        with self._lock:
            self._pin_depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._pin_depth -= 1
                seq, release = self._seq, self._pin_depth == 0
                if release:
                    self._seq = 0
            if release and seq and self._can_pin:
                try:
                    self.client._call(self.client._mem.ReleaseSnapshot,
                                      pb.ReleaseSnapshotRequest(snapshot_seq=seq), self.timeout)
                except MsaError:
                    pass   # expired already, or msad gone: the lease ends by itself

    @property
    def snapshot_seq(self):
        return self._seq

    # -- the collection ----------------------------------------------------------------
    def schema(self, kv_dtype="f32", routing_dtype="f32"):
        m, s = self.model, self.model.settings
        return pb.CollectionSchema(
            layers=list(s.layers), kv_heads=m.kv_heads, query_heads=m.query_heads,
            head_dim=m.head_dim, chunk_tokens=s.chunk_tokens, kv_dtype=_DT[kv_dtype],
            routing_dtype=_DT[routing_dtype], separate_router_keys=s.decouple_router,
            similarity=_SIM[s.similarity], head_reduce=_HEAD[s.head_reduce],
            query_reduce=_QUERY[s.query_reduce], chunk_reduce=_CHUNK[s.chunk_reduce],
            default_top_k=s.top_k, model=self.identity)

    def create(self, kv_dtype="f32", routing_dtype="f32"):
        """Creates the collection and its template collection, and stores the template
        prefix's K/V (every layer). ALREADY_EXISTS if the collection exists."""
        m = self.model
        self.client._call(self.client._mem.CreateCollection, pb.CreateCollectionRequest(
            name=self.collection, schema=self.schema(kv_dtype, routing_dtype)))
        tschema = pb.CollectionSchema(
            layers=list(range(m.num_layers)), kv_heads=m.kv_heads, query_heads=m.query_heads,
            head_dim=m.head_dim, chunk_tokens=1, kv_dtype=_DT[kv_dtype],
            routing_dtype=_DT[routing_dtype], separate_router_keys=False, model=self.identity)
        self.client._call(self.client._mem.CreateCollection, pb.CreateCollectionRequest(
            name=self.template_collection, schema=tschema))
        ids = m.template_ids()
        if ids:
            cap = m.encode_tokens(ids)
            doc = pb.Document(id=TEMPLATE_DOC_ID, text=m.template, tokens=len(ids),
                              metadata=json.dumps({"template_tokens": len(ids)}).encode())
            for l in range(m.num_layers):
                k, v, _rk = cap[l]
                doc.layers.append(pb.LayerKV(layer=l, k=_to_tensor(k.numpy(), kv_dtype),
                                             v=_to_tensor(v.numpy(), kv_dtype)))
            self.client._call(self.client._mem.Write, pb.WriteRequest(
                collection=self.template_collection, model=self.identity,
                ops=[pb.WriteOp(put=doc)]))
        return self

    def open(self):
        """Checks that the collection was made for this model; a mismatch raises
        ValueError naming the schema field."""
        s = self.client._call(self.client._mem.DescribeCollection,
                              pb.DescribeCollectionRequest(name=self.collection)).schema
        want = self.schema(kv_dtype="f32", routing_dtype="f32")
        names = {"layers": "memory layers (msa_config.router_layer_idx)",
                 "kv_heads": "num_key_value_heads", "query_heads": "num_attention_heads",
                 "head_dim": "head_dim", "chunk_tokens": "pooling_kernel_size (P)",
                 "separate_router_keys": "decouple_router", "similarity": "aux_loss_method",
                 "head_reduce": "head_reduce_method", "query_reduce": "query_reduce_method",
                 "chunk_reduce": "chunk_reduce_method", "model": "model identity"}
        for f, what in names.items():
            a, b = getattr(s, f), getattr(want, f)
            if f == "layers":
                a, b = list(a), list(b)
            if a != b:
                raise ValueError("collection %r: schema.%s is %r, the model's %s is %r" % (
                    self.collection, f, a, what, b))
        return self

    # -- documents ---------------------------------------------------------------------
    def _doc(self, doc_id, text, metadata=b""):
        tokens, layers = self.model.encode_document(text)
        d = pb.Document(id=int(doc_id), text=text, metadata=metadata, tokens=tokens)
        dt = "f32"
        for l, (k, v, rk) in layers.items():
            lk = pb.LayerKV(layer=l, k=_to_tensor(k, dt), v=_to_tensor(v, dt))
            if rk is not None:
                lk.router_k.CopyFrom(_to_tensor(rk, dt))
            d.layers.append(lk)
        return d

    def _write(self, ops, what):
        limit = self.client.max_message_bytes - (1 << 16)
        batches, cur, size = [], [], 0
        for op in ops:
            n = op.ByteSize()
            if n > limit:
                raise ValueError("%s: document %d encodes to %d bytes, over the message limit "
                                 "of %d: split its text into several documents" % (
                                     what, op.put.id or op.delete_id, n, limit))
            if cur and size + n > limit:
                batches.append(cur)
                cur, size = [], 0
            cur.append(op)
            size += n
        if cur:
            batches.append(cur)
        seq = 0
        for b in batches:    # one transaction per batch (a batch that fits one message)
            seq = self.client._call(self.client._mem.Write, pb.WriteRequest(
                collection=self.collection, model=self.identity, ops=b), self.timeout).commit_seq
        return seq

    def add(self, docs, expect_absent=False):
        """docs: {id: text} or [(id, text)]. Encodes with the model, writes (replacing
        existing ids unless expect_absent). Returns the last commit seq."""
        items = docs.items() if isinstance(docs, dict) else docs
        ops = [pb.WriteOp(put=self._doc(i, t), expect_absent=expect_absent) for i, t in items]
        return self._write(ops, "add")

    def update(self, doc_id, text):
        return self._write([pb.WriteOp(put=self._doc(doc_id, text))], "update")

    def delete(self, ids):
        return self._write([pb.WriteOp(delete_id=int(i)) for i in ids], "delete")

    # -- the memory-client protocol ----------------------------------------------------
    def template_tokens(self):
        return self._read_template()[2]

    def _read_template(self):
        """(seq read at, {layer: (k, v)}, tokens, updated_seq). The tensors are read
        once and kept while the template document is unchanged: each new snapshot
        costs one Get without tensors to check its updated_seq."""
        t = self._template
        seq = self._seq if self._pin_depth else 0
        if t is not None and seq and t[0] == seq:
            return t
        m = self.model
        req = pb.GetRequest(collection=self.template_collection, ids=[TEMPLATE_DOC_ID])
        try:
            if t is not None:
                r = self._call("Get", req, "the template prefix")
                if r.records[0].info.updated_seq == t[3]:
                    self._template = (self._seq if self._pin_depth else 0,) + t[1:]
                    return self._template
            req.with_tensors = True
            r = self._call("Get", req, "the template prefix")
            rec = r.records[0]
            kv = {l.layer: (_from_tensor(l.k), _from_tensor(l.v)) for l in rec.document.layers}
            n, upd = rec.info.tokens, rec.info.updated_seq
        except MsaError as e:
            if e.name != "NOT_FOUND":
                raise
            z = np.zeros((0, m.kv_heads, m.head_dim), np.float32)
            kv, n, upd = {l: (z, z) for l in range(m.num_layers)}, 0, 0
        self._template = (self._seq if self._pin_depth else 0, kv, n, upd)
        return self._template

    def get_template_prefix_kvcaches(self, layer_idx):
        """(k, v) of the template prefix, [1, H, L, D] float32."""
        k, v = self._read_template()[1][layer_idx]
        return (torch.from_numpy(np.ascontiguousarray(k.transpose(1, 0, 2)))[None],
                torch.from_numpy(np.ascontiguousarray(v.transpose(1, 0, 2)))[None])

    @staticmethod
    def _rows(x, mask_b):
        """[Hq, T, D] torch -> float32 numpy [T', Hq, D] of the masked tokens."""
        x = x.detach().float().transpose(0, 1)
        if mask_b is not None:
            x = x[mask_b.to(torch.bool)]
        return x.cpu().numpy()

    def doc_query(self, routing_q, query_mask, layer_idx):
        """Fetch mode. routing_q [B, Hq, T, D], query_mask [B, T]. Returns (k [H, C, D],
        v [H, C, D], scores [B, k], n_chunks [B], doc_ids [B, k]) with the chunks of
        every sample concatenated in sample order."""
        B = routing_q.shape[0]
        ks, vs, all_ids, all_scores, counts = [], [], [], [], []
        for b in range(B):
            req = pb.RouteRequest(collection=self.collection, top_k=self.top_k,
                                  model=self.identity)
            req.layers.append(pb.LayerQuery(layer=layer_idx, routing_q=_to_tensor(
                self._rows(routing_q[b], query_mask[b]), "f32")))
            r = self._call("Route", req, "Route of layer %d" % layer_idx)
            lr = r.layers[0]
            ids, scores = list(lr.doc_ids), list(lr.scores)
            n = 0
            if ids:
                g = self._call("Get", pb.GetRequest(
                    collection=self.collection, ids=ids, with_tensors=True, layers=[layer_idx],
                    skip_router_keys=True),   # the layer attends over K and V only
                    "Get of the selected documents of layer %d" % layer_idx)
                for rec in g.records:
                    lk = rec.document.layers[0]
                    k, v = _from_tensor(lk.k), _from_tensor(lk.v)
                    ks.append(k)
                    vs.append(v)
                    n += k.shape[0]
            all_ids.append(ids)
            all_scores.append(scores)
            counts.append(n)
        m = self.model
        if ks:
            K = torch.from_numpy(np.ascontiguousarray(np.concatenate(ks).transpose(1, 0, 2)))
            V = torch.from_numpy(np.ascontiguousarray(np.concatenate(vs).transpose(1, 0, 2)))
        else:
            K = V = torch.zeros(m.kv_heads, 0, m.head_dim)
        ids_t, sc_t = _pad(all_ids, all_scores)
        return K, V, sc_t, torch.tensor(counts, dtype=torch.long), ids_t

    def doc_attend(self, q, routing_q, query_mask, layer_idx, scale, doc_ids=None):
        """Attend mode. q [B, Hq, T, D] (RoPE applied), routing_q as in doc_query or None
        with doc_ids ([B, k], the documents the prefill selected). Returns (out [B, Hq,
        T, D], lse [B, Hq, T], scores [B, k], doc_ids [B, k])."""
        B, Hq, T, D = q.shape
        outs, lses, all_ids, all_scores = [], [], [], []
        for b in range(B):
            mask_b = None if query_mask is None else query_mask[b]
            req = pb.AttendRequest(collection=self.collection, top_k=self.top_k,
                                   scale=float(scale), model=self.identity)
            lq = pb.LayerQuery(layer=layer_idx, q=_to_tensor(self._rows(q[b], mask_b), "f32"))
            if doc_ids is not None:
                ids_b = [int(i) for i in np.asarray(doc_ids[b]).reshape(-1) if int(i) != 0]
                if not ids_b:    # the prefill selected nothing: the memory part is empty
                    outs.append(torch.zeros(Hq, T, D))
                    lses.append(torch.full((Hq, T), float("-inf")))
                    all_ids.append([])
                    all_scores.append([])
                    continue
                req.doc_ids.extend(ids_b)
            else:
                lq.routing_q.CopyFrom(_to_tensor(self._rows(routing_q[b], mask_b), "f32"))
            req.layers.append(lq)
            r = self._call("Attend", req, "Attend of layer %d" % layer_idx)
            la = r.layers[0]
            out = torch.from_numpy(_from_tensor(la.out).astype(np.float32))   # [T', Hq, D]
            lse = torch.from_numpy(_from_tensor(la.lse).astype(np.float32))   # [T', Hq]
            if mask_b is not None and not bool(mask_b.all()):
                full_o = torch.zeros(T, Hq, D)
                full_l = torch.full((T, Hq), float("-inf"))
                full_o[mask_b.to(torch.bool)] = out
                full_l[mask_b.to(torch.bool)] = lse
                out, lse = full_o, full_l
            outs.append(out.transpose(0, 1))
            lses.append(lse.transpose(0, 1))
            all_ids.append(list(la.doc_ids))
            all_scores.append(list(la.scores))
        ids_t, sc_t = _pad(all_ids, all_scores)
        return torch.stack(outs), torch.stack(lses), sc_t, ids_t


def _pad(ids, scores):
    k = max([len(x) for x in ids] + [0])
    it = torch.zeros(len(ids), k, dtype=torch.long)
    st = torch.full((len(ids), k), float("-inf"))
    for b, (i, s) in enumerate(zip(ids, scores)):
        if i:
            it[b, :len(i)] = torch.tensor([int(x) for x in i], dtype=torch.long)
        if s:
            st[b, :len(s)] = torch.tensor(s, dtype=torch.float32)
    return it, st
