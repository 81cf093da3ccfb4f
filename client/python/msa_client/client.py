"""NumPy-friendly wrapper over the generated msa.v1 stubs.

Arrays go in as NumPy arrays of any float dtype (uint16 arrays are taken as bfloat16
bit patterns, the .npy convention of msactl) and come out as np.float32. Errors raise
MsaError with the gRPC status code and the server's message.

Runs in the project's venv (ops/venv: PyPI grpcio, protobuf, numpy; pinned in ops/python.lock).
"""

import grpc
import numpy as np

from . import memory_pb2 as pb
from . import memory_pb2_grpc as pbg

__all__ = ["Client", "MsaError", "AttendLayer", "Result", "f32_to_bf16_bits", "bf16_bits_to_f32"]

# ------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------

_DT = {
    "f32": pb.F32, "float32": pb.F32, "f16": pb.F16, "float16": pb.F16,
    "bf16": pb.BF16, "bfloat16": pb.BF16, "i8": pb.I8, "int8": pb.I8,
}
_DT_NAME = {pb.F32: "F32", pb.F16: "F16", pb.BF16: "BF16", pb.I8: "I8", pb.DTYPE_UNSPECIFIED: "DTYPE_UNSPECIFIED"}


def _dtype(x):
    """'bf16' / 'BF16' / pb.BF16 -> the proto enum value."""
    if x is None:
        return None
    if isinstance(x, str):
        try:
            return _DT[x.lower()]
        except KeyError:
            raise ValueError("dtype %r: want f32, f16, bf16 (or i8 for routing)" % x) from None
    return int(x)


def f32_to_bf16_bits(a):
    """float array -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_bits_to_f32(u):
    """uint16 bfloat16 bit patterns -> float32."""
    u = np.ascontiguousarray(u, dtype=np.uint16)
    return (u.astype(np.uint32) << 16).view(np.float32)


def _to_tensor(a, dtype=None):
    """NumPy array -> pb.Tensor. dtype None keeps float32/float16 (uint16 = bf16 bits);
    other dtypes become float32. dtype 'f32'/'f16'/'bf16' converts."""
    a = np.asarray(a)
    dt = _dtype(dtype)
    if dt is None:
        if a.dtype == np.float16:
            dt = pb.F16
        elif a.dtype == np.uint16:
            dt = pb.BF16
        else:
            dt = pb.F32
    if dt == pb.BF16:
        data = a if a.dtype == np.uint16 else f32_to_bf16_bits(a)
        data = np.ascontiguousarray(data, dtype="<u2")
    elif dt == pb.F16:
        src = bf16_bits_to_f32(a) if a.dtype == np.uint16 else a
        data = np.ascontiguousarray(src, dtype="<f2")
    elif dt == pb.F32:
        src = bf16_bits_to_f32(a) if a.dtype == np.uint16 else a
        data = np.ascontiguousarray(src, dtype="<f4")
    else:
        raise ValueError("cannot send tensors as %s" % _DT_NAME.get(dt, dt))
    return pb.Tensor(dtype=dt, shape=list(a.shape), data=data.tobytes())


def _from_tensor(t):
    """pb.Tensor -> np.float32 array of its shape (None for an empty tensor)."""
    if not t.shape and not t.data:
        return None
    shape = tuple(t.shape)
    if t.dtype == pb.F32:
        a = np.frombuffer(t.data, dtype="<f4")
    elif t.dtype == pb.F16:
        a = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    elif t.dtype == pb.BF16:
        a = bf16_bits_to_f32(np.frombuffer(t.data, dtype="<u2"))
    elif t.dtype == pb.I8:
        a = np.frombuffer(t.data, dtype="i1").astype(np.float32)
    else:
        raise MsaError(grpc.StatusCode.INTERNAL, "tensor with dtype %d" % t.dtype)
    return a.astype(np.float32, copy=True).reshape(shape)


def _query(a, dtype=None):
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[None]
    return _to_tensor(a, dtype)


# ------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------

class MsaError(Exception):
    """A failed call: .code (grpc.StatusCode), .name ('NOT_FOUND'), .details (message)."""

    def __init__(self, code, details):
        super().__init__("%s: %s" % (code.name if code is not None else "UNKNOWN", details))
        self.code = code
        self.details = details

    @property
    def name(self):
        return self.code.name if self.code is not None else "UNKNOWN"


class Result(dict):
    """A dict layer -> answer, with .snapshot_seq of the read."""

    snapshot_seq = 0


class Records(list):
    """Get's list of document dicts, with .snapshot_seq of the read."""

    snapshot_seq = 0


class Page(tuple):
    """list_docs' (documents, next_after_id), with .snapshot_seq of the read."""

    snapshot_seq = 0


class AttendLayer:
    """One layer of an Attend answer."""

    __slots__ = ("layer", "doc_ids", "scores", "out", "lse")

    def __init__(self, layer, doc_ids, scores, out, lse):
        self.layer = layer
        self.doc_ids = doc_ids  # np.uint64 [k]
        self.scores = scores    # np.float32 [k] (empty when doc_ids were given)
        self.out = out          # np.float32 [T, Hq, D]
        self.lse = lse          # np.float32 [T, Hq]; -inf where nothing was selected

    def __repr__(self):
        return "AttendLayer(layer=%d, doc_ids=%s, out=%s)" % (
            self.layer, list(self.doc_ids), None if self.out is None else self.out.shape)


def _enum_name(enum, v):
    try:
        return enum.Name(v)
    except ValueError:
        return str(v)


def _schema_dict(s):
    return {
        "layers": list(s.layers), "kv_heads": s.kv_heads, "query_heads": s.query_heads,
        "head_dim": s.head_dim, "chunk_tokens": s.chunk_tokens,
        "kv_dtype": _DT_NAME.get(s.kv_dtype, s.kv_dtype),
        "routing_dtype": _DT_NAME.get(s.routing_dtype, s.routing_dtype),
        "separate_router_keys": s.separate_router_keys,
        "similarity": _enum_name(pb.Similarity, s.similarity),
        "head_reduce": _enum_name(pb.HeadReduce, s.head_reduce),
        "query_reduce": _enum_name(pb.QueryReduce, s.query_reduce),
        "chunk_reduce": _enum_name(pb.ChunkReduce, s.chunk_reduce),
        "default_top_k": s.default_top_k, "model": s.model,
    }


def _info_dict(ci):
    return {
        "name": ci.name, "schema": _schema_dict(ci.schema), "documents": ci.documents,
        "chunks": ci.chunks, "tokens": ci.tokens, "bytes": ci.bytes, "created_seq": ci.created_seq,
    }


def _docinfo_dict(d):
    return {
        "id": d.id, "version": d.version, "tokens": d.tokens, "chunks": d.chunks,
        "created_seq": d.created_seq, "updated_seq": d.updated_seq,
        "updated_unix_ms": d.updated_unix_ms, "text_bytes": d.text_bytes,
        "metadata_bytes": d.metadata_bytes,
    }


def _enum_value(enum, prefix, x):
    if isinstance(x, str):
        name = x.upper()
        if prefix and not name.startswith(prefix):
            name = prefix + name
        return enum.Value(name)
    return int(x)


# ------------------------------------------------------------------------------------
# client
# ------------------------------------------------------------------------------------

class Client:
    """A connection to msad. Thread-safe (one gRPC channel).

    addr: "host:port" or "unix:/path". token / token_file: bearer token. tls: use TLS
    (root_certs: PEM bytes or a path; None = system roots), server_name overrides the
    name checked in the certificate. timeout: default deadline per call in seconds
    (None = none). max_message_mb: largest message sent or received.
    """

    def __init__(self, addr="127.0.0.1:7420", token=None, token_file=None, tls=False,
                 root_certs=None, server_name=None, timeout=30.0, max_message_mb=256):
        if token is None and token_file:
            with open(token_file) as f:
                token = f.readline().strip()
        n = int(max_message_mb) << 20
        opts = [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]
        if root_certs is not None or tls:
            if isinstance(root_certs, str):
                with open(root_certs, "rb") as f:
                    root_certs = f.read()
            if server_name:
                opts.append(("grpc.ssl_target_name_override", server_name))
            self._ch = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certs), opts)
        else:
            self._ch = grpc.insecure_channel(addr, opts)
        self.addr = addr
        self.timeout = timeout
        self.max_message_bytes = n
        self._md = (("authorization", "Bearer " + token),) if token else None
        # snapshot_seq of the last Route/Attend/Get/List answer of this client (with
        # several threads on one client, read the result's .snapshot_seq instead).
        self.last_snapshot_seq = 0
        self._mem = pbg.MemoryStub(self._ch)
        self._adm = pbg.AdminStub(self._ch)
        self._health = self._ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda s: (b"\x0a" + _varint(len(s)) + s) if s else b"",
            response_deserializer=lambda b: b)
        self._schemas = {}

    # -- plumbing ----------------------------------------------------------------------
    def close(self):
        self._ch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, fn, req, timeout=None):
        t = self.timeout if timeout is None else timeout
        try:
            return fn(req, timeout=t, metadata=self._md)
        except grpc.RpcError as e:
            raise MsaError(e.code(), e.details()) from None

    def _schema(self, collection):
        s = self._schemas.get(collection)
        if s is None:
            s = self._call(self._mem.DescribeCollection,
                           pb.DescribeCollectionRequest(name=collection)).schema
            self._schemas[collection] = s
        return s

    # -- collections -------------------------------------------------------------------
    def create_collection(self, name, layers=None, kv_heads=0, query_heads=0, head_dim=0,
                          chunk_tokens=64, kv_dtype="bf16", routing_dtype="bf16",
                          separate_router_keys=False, similarity="cosine", head_reduce="mean",
                          query_reduce="max", chunk_reduce="max", default_top_k=0, model="",
                          schema=None, timeout=None):
        """Creates a collection; returns its info dict. schema: a pb.CollectionSchema
        (overrides the keyword arguments)."""
        if schema is None:
            schema = pb.CollectionSchema(
                layers=list(layers or []), kv_heads=kv_heads, query_heads=query_heads,
                head_dim=head_dim, chunk_tokens=chunk_tokens, kv_dtype=_dtype(kv_dtype),
                routing_dtype=_dtype(routing_dtype), separate_router_keys=separate_router_keys,
                similarity=_enum_value(pb.Similarity, "", similarity),
                head_reduce=_enum_value(pb.HeadReduce, "HEAD_", head_reduce),
                query_reduce=_enum_value(pb.QueryReduce, "QUERY_", query_reduce),
                chunk_reduce=_enum_value(pb.ChunkReduce, "CHUNK_", chunk_reduce),
                default_top_k=default_top_k, model=model)
        self._schemas.pop(name, None)
        r = self._call(self._mem.CreateCollection,
                       pb.CreateCollectionRequest(name=name, schema=schema), timeout)
        return _info_dict(r)

    def drop_collection(self, name, timeout=None):
        """Drops a collection and its documents; returns the commit seq."""
        self._schemas.pop(name, None)
        return self._call(self._mem.DropCollection, pb.DropCollectionRequest(name=name),
                          timeout).commit_seq

    drop = drop_collection

    def list_collections(self, timeout=None):
        r = self._call(self._mem.ListCollections, pb.ListCollectionsRequest(), timeout)
        return [_info_dict(c) for c in r.collections]

    def describe(self, name, timeout=None):
        r = self._call(self._mem.DescribeCollection, pb.DescribeCollectionRequest(name=name),
                       timeout)
        self._schemas[name] = r.schema
        return _info_dict(r)

    describe_collection = describe

    # -- writes ------------------------------------------------------------------------
    def document(self, collection, id, layers, tokens=None, text="", metadata=b"", raw=False,
                 dtype="auto"):
        """Builds a pb.Document. layers: {layer: (k, v) | (k, v, router_k) | {"k","v",
        "router_k"}} with arrays [C, H, D] (pooled) or [N, H, D] (raw). dtype 'auto' sends
        pooled tensors in the collection's storage dtypes (the same rounding the server
        does) and raw ones as float32 (the server pools in float32); or 'f32'/'f16'/'bf16'
        / None (each array's own dtype)."""
        sch = None
        if dtype == "auto" or tokens is None:
            sch = self._schema(collection)
        doc = pb.Document(id=id, text=text, metadata=bytes(metadata), raw=raw)
        rows = None
        for layer, kv in sorted(layers.items()):
            if isinstance(kv, dict):
                k, v, rk = kv["k"], kv["v"], kv.get("router_k")
            else:
                k, v, rk = (tuple(kv) + (None,))[:3]
            if dtype == "auto":
                kdt = pb.F32 if raw else (sch.kv_dtype or pb.BF16)
                rdt = sch.routing_dtype or pb.BF16
                rdt = pb.F32 if raw else (rdt if rdt in (pb.F32, pb.F16, pb.BF16) else kdt)
            else:
                kdt = rdt = _dtype(dtype)
            lk = pb.LayerKV(layer=layer, k=_to_tensor(k, kdt), v=_to_tensor(v, kdt))
            if rk is not None:
                lk.router_k.CopyFrom(_to_tensor(rk, rdt))
            doc.layers.append(lk)
            rows = np.asarray(k).shape[0]
        if tokens is None:
            tokens = rows if raw else rows * sch.chunk_tokens
        doc.tokens = int(tokens)
        return doc

    def write(self, collection, ops, model="", timeout=None):
        """One Write request of pb.WriteOp ops (atomic). Returns the pb.WriteResponse."""
        return self._call(self._mem.Write,
                          pb.WriteRequest(collection=collection, ops=list(ops), model=model),
                          timeout)

    def put(self, collection, id, layers, tokens=None, text="", metadata=b"", raw=False,
            expect_version=0, expect_absent=False, model="", dtype="auto", timeout=None):
        """Inserts or replaces one document. Returns {"commit_seq", "version"}."""
        doc = self.document(collection, id, layers, tokens, text, metadata, raw, dtype)
        op = pb.WriteOp(put=doc, expect_version=expect_version, expect_absent=expect_absent)
        r = self.write(collection, [op], model, timeout)
        return {"commit_seq": r.commit_seq, "version": r.versions[0] if r.versions else 0}

    def put_many(self, collection, docs, max_batch_bytes=None, model="", timeout=None):
        """Writes pb.Documents (see document()) in batches under max_batch_bytes (default:
        the message limit less 64 KiB). Atomic per batch only. Returns the list of
        WriteResponses."""
        limit = max_batch_bytes or (self.max_message_bytes - (64 << 10))
        out, batch, size = [], [], 0
        for d in docs:
            op = pb.WriteOp(put=d)
            n = op.ByteSize() + 6
            if batch and size + n > limit:
                out.append(self.write(collection, batch, model, timeout))
                batch, size = [], 0
            batch.append(op)
            size += n
        if batch:
            out.append(self.write(collection, batch, model, timeout))
        return out

    def delete(self, collection, ids, expect_version=0, model="", timeout=None):
        """Deletes ids (an int or a list) in one atomic write; returns the commit seq."""
        if isinstance(ids, (int, np.integer)):
            ids = [ids]
        ops = [pb.WriteOp(delete_id=int(i), expect_version=expect_version) for i in ids]
        return self.write(collection, ops, model, timeout).commit_seq

    # -- reads -------------------------------------------------------------------------
    def get(self, collection, ids, with_text=True, with_metadata=True, with_tensors=True,
            layers=None, min_seq=0, snapshot_seq=0, hold_snapshot_ms=0, router_keys=True,
            timeout=None):
        """Documents as dicts {"id", "info", "text", "metadata", "snapshot_seq", "layers":
        {layer: {"k", "v"[, "router_k"]: np.float32 [C, H, D]}}}. ids: an int (one dict
        back) or a list (a Records list with .snapshot_seq). snapshot_seq / hold_snapshot_ms:
        read a held snapshot / hold the one read (see route). router_keys=False: K and V
        only (a third fewer bytes when the collection has separate router keys)."""
        single = isinstance(ids, (int, np.integer))
        idl = [int(ids)] if single else [int(i) for i in ids]
        r = self._call(self._mem.Get, pb.GetRequest(
            collection=collection, ids=idl, with_text=with_text, with_metadata=with_metadata,
            with_tensors=with_tensors, layers=list(layers or []), min_seq=min_seq,
            snapshot_seq=snapshot_seq, hold_snapshot_ms=hold_snapshot_ms,
            skip_router_keys=not router_keys), timeout)
        self.last_snapshot_seq = r.snapshot_seq
        out = Records()
        out.snapshot_seq = r.snapshot_seq
        for rec in r.records:
            d = {"id": rec.info.id, "info": _docinfo_dict(rec.info), "snapshot_seq": r.snapshot_seq}
            if with_text:
                d["text"] = rec.document.text
            if with_metadata:
                d["metadata"] = rec.document.metadata
            if with_tensors:
                ls = {}
                for l in rec.document.layers:
                    e = {"k": _from_tensor(l.k), "v": _from_tensor(l.v),
                         "dtype": _DT_NAME.get(l.k.dtype, l.k.dtype)}
                    if l.HasField("router_k") and (l.router_k.shape or l.router_k.data):
                        e["router_k"] = _from_tensor(l.router_k)
                    ls[l.layer] = e
                d["layers"] = ls
            out.append(d)
        return out[0] if single else out

    def list_docs(self, collection, after_id=0, limit=0, snapshot_seq=0, hold_snapshot_ms=0,
                  timeout=None):
        """One page: a Page (list of document info dicts, next_after_id; 0 = no more) with
        .snapshot_seq. snapshot_seq / hold_snapshot_ms: as route."""
        r = self._call(self._mem.List, pb.ListRequest(
            collection=collection, after_id=after_id, limit=limit, snapshot_seq=snapshot_seq,
            hold_snapshot_ms=hold_snapshot_ms), timeout)
        self.last_snapshot_seq = r.snapshot_seq
        page = Page(([_docinfo_dict(d) for d in r.documents], r.next_after_id))
        page.snapshot_seq = r.snapshot_seq
        return page

    def iter_docs(self, collection, page=1000):
        after = 0
        while True:
            docs, after = self.list_docs(collection, after, page)
            yield from docs
            if not after:
                return

    def route(self, collection, queries, top_k=0, exclude_ids=(), min_seq=0, model="",
              query_dtype=None, snapshot_seq=0, hold_snapshot_ms=0, timeout=None):
        """queries: {layer: routing_q [T, Hq, D] (or [Hq, D])}. Returns a Result {layer:
        (doc_ids np.uint64, scores np.float32)}, best first, with .snapshot_seq.

        Held snapshots: hold_snapshot_ms > 0 keeps the snapshot this call read open for that
        long after it answers; pass its seq (result.snapshot_seq, also
        client.last_snapshot_seq) as snapshot_seq to later route/attend/get/list_docs calls
        so they read exactly the same versions (with hold_snapshot_ms they also renew the
        lease); release_snapshot(seq) ends it early."""
        req = pb.RouteRequest(collection=collection, top_k=top_k,
                              exclude_ids=[int(i) for i in exclude_ids], min_seq=min_seq,
                              model=model, snapshot_seq=snapshot_seq,
                              hold_snapshot_ms=hold_snapshot_ms)
        for layer, rq in queries.items():
            req.layers.append(pb.LayerQuery(layer=layer, routing_q=_query(rq, query_dtype)))
        r = self._call(self._mem.Route, req, timeout)
        self.last_snapshot_seq = r.snapshot_seq
        res = Result()
        res.snapshot_seq = r.snapshot_seq
        for l in r.layers:
            res[l.layer] = (np.array(l.doc_ids, dtype=np.uint64), np.array(l.scores, dtype=np.float32))
        return res

    def attend(self, collection, queries, top_k=0, doc_ids=None, exclude_ids=(), scale=0.0,
               out_dtype="f32", min_seq=0, model="", query_dtype=None, snapshot_seq=0,
               hold_snapshot_ms=0, timeout=None):
        """queries: {layer: (routing_q, q)}, or {layer: q} with doc_ids (routing skipped).
        Returns a Result {layer: AttendLayer(doc_ids, scores, out np.float32 [T, Hq, D],
        lse np.float32 [T, Hq])} with .snapshot_seq. snapshot_seq / hold_snapshot_ms: as
        route."""
        req = pb.AttendRequest(collection=collection, top_k=top_k,
                               exclude_ids=[int(i) for i in exclude_ids], min_seq=min_seq,
                               doc_ids=[int(i) for i in (doc_ids or [])], scale=scale,
                               out_dtype=_dtype(out_dtype) if out_dtype else 0, model=model,
                               snapshot_seq=snapshot_seq, hold_snapshot_ms=hold_snapshot_ms)
        for layer, qq in queries.items():
            if isinstance(qq, (tuple, list)):
                rq, q = qq
            else:
                rq, q = None, qq
            lq = pb.LayerQuery(layer=layer, q=_query(q, query_dtype))
            if rq is not None:
                lq.routing_q.CopyFrom(_query(rq, query_dtype))
            req.layers.append(lq)
        r = self._call(self._mem.Attend, req, timeout)
        self.last_snapshot_seq = r.snapshot_seq
        res = Result()
        res.snapshot_seq = r.snapshot_seq
        for l in r.layers:
            res[l.layer] = AttendLayer(l.layer, np.array(l.doc_ids, dtype=np.uint64),
                                       np.array(l.scores, dtype=np.float32),
                                       _from_tensor(l.out), _from_tensor(l.lse))
        return res

    def release_snapshot(self, snapshot_seq, timeout=None):
        """Ends this client's lease on a held snapshot; False when none was held (it
        expired, was released, or the server revoked it)."""
        r = self._call(self._mem.ReleaseSnapshot,
                       pb.ReleaseSnapshotRequest(snapshot_seq=int(snapshot_seq)), timeout)
        return r.released

    # -- admin -------------------------------------------------------------------------
    def stats(self, timeout=None):
        r = self._call(self._mem.Stats, pb.StatsRequest(), timeout)
        return {
            "version": r.version, "backend": r.backend, "commit_seq": r.commit_seq,
            "store_bytes": r.store_bytes, "collections": r.collections,
            "documents": r.documents, "chunks": r.chunks,
            "devices": [{"name": d.name, "memory_total": d.memory_total,
                         "memory_used": d.memory_used, "routing_bytes": d.routing_bytes,
                         "cache_bytes": d.cache_bytes} for d in r.devices],
            "counters": dict(r.counters),
        }

    def backup(self, name, compact=False, timeout=None):
        r = self._call(self._adm.Backup, pb.BackupRequest(name=name, compact=compact), timeout)
        return {"snapshot_seq": r.snapshot_seq, "bytes": r.bytes}

    def verify(self, collection="", timeout=None):
        r = self._call(self._adm.Verify, pb.VerifyRequest(collection=collection), timeout)
        return {"documents_checked": r.documents_checked, "problems": list(r.problems)}

    def health(self, service="", timeout=None):
        """grpc.health.v1 Check: 'SERVING', 'NOT_SERVING', 'UNKNOWN' or 'SERVICE_UNKNOWN'."""
        b = self._call(self._health, service.encode(), timeout)
        status = 0
        if len(b) >= 2 and b[0] == 0x08:
            status = b[1]
        return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(status, str(status))


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

