"""Integration tests of msad over gRPC: a real daemon on a temp dir and
loopback, driven by grpcio stubs generated from rpc/memory.proto at test
time (a client this project did not write).

Covers: health; collections CRUD; write + route + attend against a small
inline fp64 reference (F32, COSINE/HEAD_MEAN/QUERY_MAX/CHUNK_MAX) and against
tests/oracle.py (BF16, separate router keys, DOT/HEAD_MAX/QUERY_MEAN/
CHUNK_MEAN, raw writes); Get/List/versions; every status code of SEMANTICS'
table except INTERNAL (INVALID_ARGUMENT with field names, NOT_FOUND,
ALREADY_EXISTS, FAILED_PRECONDITION, RESOURCE_EXHAUSTED for request, response
and handler-queue limits, UNAUTHENTICATED, PERMISSION_DENIED,
DEADLINE_EXCEEDED from min_seq and from a client deadline, UNAVAILABLE while
shutting down); garbage bytes to every method; TLS; restart keeps
everything; SIGTERM under write load loses no acknowledged write; unix
socket; metrics endpoint; Stats counters; flags, config file, exit codes.

Run: ~/.cache/msad/venv/bin/python tests/test_daemon.py  (MSA_BIN, MSA_SOURCE as in
daemon_util.py). Exits 77 (skipped) when msad has not been built.
"""
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import re
import time
import urllib.request
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import (Daemon, GrpcCase, check_stats_metrics, from_tensor,  # noqa: E402
                         msad_path, stubs, tensor)

if not os.access(msad_path(), os.X_OK):
    print("skip: %s not built" % msad_path())
    sys.exit(77)

import grpc  # noqa: E402

pb, pb_grpc, hpb, hpb_grpc = stubs()
SC = grpc.StatusCode

# A small collection: 2 memory layers, H = 2, Hq = 4 (G = 2), D = 8, P = 4.
LAYERS = [3, 7]
H, HQ, D, P = 2, 4, 8, 4


def schema(**kw):
    base = dict(layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D, chunk_tokens=P,
                kv_dtype=pb.F32, routing_dtype=pb.F32)
    base.update(kw)
    return pb.CollectionSchema(**base)


def make_doc(rng, doc_id, tokens, text=None, meta=b""):
    """(Document proto, {layer: (K, V)} as float32 arrays)."""
    c = (tokens + P - 1) // P
    kv = {}
    layers = []
    for l in LAYERS:
        k = rng.standard_normal((c, H, D)).astype(np.float32)
        v = rng.standard_normal((c, H, D)).astype(np.float32)
        kv[l] = (k, v)
        layers.append(pb.LayerKV(layer=l, k=tensor(k), v=tensor(v)))
    d = pb.Document(id=doc_id, text=text if text is not None else "doc %d" % doc_id,
                    metadata=meta, tokens=tokens, layers=layers)
    return d, kv


# ---- reference (fp64) ------------------------------------------------------------

def _oracle():
    """tests/oracle.py (an independent NumPy reference) when it is there and
    has the API used below; else None and the inline fp64 reference serves."""
    try:
        import oracle
        oracle.Oracle().route_layer, oracle.Oracle.attend_layer, oracle.Schema, oracle.Doc  # noqa: B018
        return oracle
    except Exception:
        return None


ORACLE = _oracle()


def ref_route(q, docs, layer, top_k, exclude=()):
    """COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX over docs {id: {layer: (K, V)}}.
    Returns [(id, score)] best first, ties by smaller id."""
    q = q.astype(np.float64)
    qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-300)
    qn[np.linalg.norm(q, axis=-1) == 0] = 0
    g = HQ // H
    out = []
    for did, kv in docs.items():
        if did in exclude:
            continue
        k = kv[layer][0].astype(np.float64)
        kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
        kq = np.repeat(kn, g, axis=1)                  # [C, Hq, D]: head j reads kv head j/G
        s = np.einsum("tjd,rjd->tjr", qn, kq)          # [T, Hq, C]
        s = s.mean(axis=1)                             # head mean -> [T, C]
        s = s.max(axis=0)                              # query max -> [C]
        out.append((did, s.max()))                     # chunk max
    out.sort(key=lambda x: (-x[1], x[0]))
    return out[:top_k]


def ref_attend(q, docs, ids, layer, scale=None):
    """out [T, Hq, D], lse [T, Hq] over all pooled rows of the selected docs."""
    q = q.astype(np.float64)
    if scale is None or scale == 0:
        scale = 1.0 / np.sqrt(D)
    if not ids:
        return np.zeros(q.shape), np.full(q.shape[:2], -np.inf)
    k = np.concatenate([docs[i][layer][0] for i in ids]).astype(np.float64)
    v = np.concatenate([docs[i][layer][1] for i in ids]).astype(np.float64)
    g = HQ // H
    kq, vq = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)   # [R, Hq, D]
    logits = scale * np.einsum("tjd,rjd->tjr", q, kq)
    m = logits.max(axis=-1, keepdims=True)
    w = np.exp(logits - m)
    ssum = w.sum(axis=-1, keepdims=True)
    lse = (m + np.log(ssum))[..., 0]
    out = np.einsum("tjr,rjd->tjd", w / ssum, vq)
    return out, lse


def raw_call(channel, method, payload, timeout=10):
    """A unary call with raw bytes (to send malformed messages)."""
    f = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return f(payload, timeout=timeout)


class DaemonCase(GrpcCase):
    daemon = None



# ==== one shared daemon for the functional checks ==================================

class TestFunctional(DaemonCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(metrics=True)
        cls.sock = os.path.join(cls.d.tmp, "msad.sock")
        cls.backups = os.path.join(cls.d.tmp, "backups")
        os.mkdir(cls.backups)
        cls.d.args += ["--backup-dir", cls.backups]
        cls.d.listen = ["127.0.0.1:0", "unix:" + cls.sock]
        cls.d.start()
        cls.m = cls.d.memory()
        cls.a = cls.d.admin()
        cls.rng = np.random.default_rng(1234)

    @classmethod
    def tearDownClass(cls):
        rc = cls.d.stop()
        cls.d.cleanup()
        assert rc == 0, "msad exit code %r" % rc

    def create(self, name, **kw):
        return self.m.CreateCollection(pb.CreateCollectionRequest(name=name, schema=schema(**kw)))

    # -- health, collections
    def test_health(self):
        h = self.d.health()
        self.assertEqual(h.Check(hpb.HealthCheckRequest()).status, hpb.HealthCheckResponse.SERVING)
        self.assertEqual(h.Check(hpb.HealthCheckRequest(service="msa.v1.Memory")).status,
                         hpb.HealthCheckResponse.SERVING)
        self.assertCode(SC.NOT_FOUND, h.Check, hpb.HealthCheckRequest(service="no.such.Service"))

    def test_collections_crud(self):
        info = self.create("crud", model="enc@1")
        self.assertEqual(info.name, "crud")
        self.assertEqual(list(info.schema.layers), LAYERS)
        self.assertEqual(info.schema.default_top_k, 16)      # proto default applied
        self.assertEqual(info.schema.model, "enc@1")
        names = [c.name for c in self.m.ListCollections(pb.ListCollectionsRequest()).collections]
        self.assertIn("crud", names)
        desc = self.m.DescribeCollection(pb.DescribeCollectionRequest(name="crud"))
        self.assertEqual(desc.schema, info.schema)
        self.assertEqual(desc.documents, 0)
        self.assertCode(SC.ALREADY_EXISTS, self.create, "crud")
        seq = self.m.DropCollection(pb.DropCollectionRequest(name="crud")).commit_seq
        self.assertGreater(seq, info.created_seq)
        self.assertCode(SC.NOT_FOUND, self.m.DescribeCollection,
                        pb.DescribeCollectionRequest(name="crud"))
        self.assertCode(SC.NOT_FOUND, self.m.DropCollection, pb.DropCollectionRequest(name="crud"))

    # -- data path against the reference
    def test_write_route_attend(self):
        self.create("ra")
        docs, protos = {}, []
        for i in range(1, 9):
            d, kv = make_doc(self.rng, i * 10, tokens=3 + 2 * i)
            docs[i * 10] = kv
            protos.append(pb.WriteOp(put=d))
        w = self.m.Write(pb.WriteRequest(collection="ra", ops=protos))
        self.assertEqual(list(w.versions), [1] * 8)
        T = 3
        q = {l: self.rng.standard_normal((T, HQ, D)).astype(np.float32) for l in LAYERS}
        lq = [pb.LayerQuery(layer=l, routing_q=tensor(q[l]), q=tensor(q[l])) for l in LAYERS]

        r = self.m.Route(pb.RouteRequest(collection="ra", layers=lq, top_k=3, exclude_ids=[40],
                                         min_seq=w.commit_seq))
        self.assertGreaterEqual(r.snapshot_seq, w.commit_seq)
        self.assertEqual([l.layer for l in r.layers], LAYERS)
        for lr in r.layers:
            want = ref_route(q[lr.layer], docs, lr.layer, 3, exclude={40})
            self.assertEqual(list(lr.doc_ids), [i for i, _ in want])
            np.testing.assert_allclose(list(lr.scores), [s for _, s in want], rtol=1e-4, atol=1e-5)

        a = self.m.Attend(pb.AttendRequest(collection="ra", layers=lq, top_k=4))
        for la in a.layers:
            want_ids = [i for i, _ in ref_route(q[la.layer], docs, la.layer, 4)]
            self.assertEqual(list(la.doc_ids), want_ids)
            out, lse = ref_attend(q[la.layer], docs, want_ids, la.layer)
            self.assertEqual(la.out.dtype, pb.F32)
            self.assertEqual(list(la.out.shape), [T, HQ, D])
            np.testing.assert_allclose(from_tensor(la.out), out, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(from_tensor(la.lse), lse, rtol=1e-4, atol=1e-5)

        # Explicit documents, a scale, BF16 output.
        a = self.m.Attend(pb.AttendRequest(collection="ra", layers=lq, doc_ids=[20, 70],
                                           scale=0.5, out_dtype=pb.BF16))
        for la in a.layers:
            self.assertEqual(list(la.doc_ids), [20, 70])
            self.assertEqual(len(la.scores), 0)
            out, lse = ref_attend(q[la.layer], docs, [20, 70], la.layer, scale=0.5)
            self.assertEqual(la.out.dtype, pb.BF16)
            np.testing.assert_allclose(from_tensor(la.out), out, rtol=2e-2, atol=2e-2)
            np.testing.assert_allclose(from_tensor(la.lse), lse, rtol=1e-4, atol=1e-5)

    def test_oracle_all_options(self):
        """BF16 storage, separate router keys, DOT/HEAD_MAX/QUERY_MEAN/
        CHUNK_MEAN, a raw (server-pooled) write, compared with tests/oracle.py."""
        if ORACLE is None:
            self.skipTest("tests/oracle.py not available")
        o = ORACLE
        kw = dict(layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D, chunk_tokens=P,
                  kv_dtype=o.BF16, routing_dtype=o.BF16, separate_router_keys=True,
                  similarity=o.DOT, head_reduce=o.HEAD_MAX, query_reduce=o.QUERY_MEAN,
                  chunk_reduce=o.CHUNK_MEAN)
        self.m.CreateCollection(pb.CreateCollectionRequest(name="orc", schema=pb.CollectionSchema(**kw)))
        osch = o.Schema(**kw)
        rng = self.rng
        docs, ops = {}, []
        for i in range(1, 13):
            tokens = 1 + 3 * i
            raw = i % 3 == 0
            n = tokens if raw else (tokens + P - 1) // P
            layers, kd, vd, rd = [], {}, {}, {}
            for l in LAYERS:
                k, v, r = (rng.standard_normal((n, H, D)).astype(np.float32) for _ in range(3))
                layers.append(pb.LayerKV(layer=l, k=tensor(k), v=tensor(v), router_k=tensor(r)))
                if raw:
                    k, v, r = (o.pool(x, P) for x in (k, v, r))
                kd[l], vd[l], rd[l] = (o.round_to(o.BF16, x) for x in (k, v, r))
            ops.append(pb.WriteOp(put=pb.Document(id=i, tokens=tokens, raw=raw, layers=layers)))
            docs[i] = o.Doc(id=i, version=1, tokens=tokens, chunks=(tokens + P - 1) // P,
                            created_seq=0, updated_seq=0, text=b"", metadata=b"", k=kd, v=vd, r=rd)
        self.m.Write(pb.WriteRequest(collection="orc", ops=ops))
        T = 4
        q = {l: rng.standard_normal((T, HQ, D)).astype(np.float32) for l in LAYERS}
        lq = [pb.LayerQuery(layer=l, routing_q=tensor(q[l]), q=tensor(q[l])) for l in LAYERS]
        a = self.m.Attend(pb.AttendRequest(collection="orc", layers=lq, top_k=5, exclude_ids=[2]))
        for la in a.layers:
            ranked, bound = o.Oracle().route_layer(osch, docs, la.layer, q[la.layer], 5, exclude=[2])
            tol = 1e-2 * bound
            ref = {did: sc for sc, did in ranked}
            self.assertEqual(len(la.doc_ids), 5)
            for pos, (did, sc) in enumerate(zip(la.doc_ids, la.scores)):
                # Position-wise: the id returned here scores like the
                # reference's id at this rank (robust to near-ties).
                self.assertAlmostEqual(ref[did], ranked[pos][0], delta=tol)
                self.assertAlmostEqual(sc, ref[did], delta=tol)
            out, lse = o.Oracle.attend_layer(osch, docs, la.layer, list(la.doc_ids), q[la.layer])
            np.testing.assert_allclose(from_tensor(la.out), out, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(from_tensor(la.lse), lse, rtol=1e-3, atol=1e-3)
        # Stored tensors come back as the oracle rounded/pooled them.
        g = self.m.Get(pb.GetRequest(collection="orc", ids=[3, 4], with_tensors=True))
        for rec in g.records:
            for l in rec.document.layers:
                self.assertEqual(l.k.dtype, pb.BF16)
                np.testing.assert_allclose(from_tensor(l.k), docs[rec.info.id].k[l.layer], rtol=1e-2, atol=1e-2)
                np.testing.assert_allclose(from_tensor(l.router_k), docs[rec.info.id].r[l.layer],
                                           rtol=1e-2, atol=1e-2)

    def test_get_list_versions(self):
        self.create("gl")
        d, kv = make_doc(self.rng, 5, tokens=9, text="hello wörld", meta=b"\x00\x01meta")
        w1 = self.m.Write(pb.WriteRequest(collection="gl", ops=[pb.WriteOp(put=d)]))
        d2, kv2 = make_doc(self.rng, 5, tokens=4)
        w2 = self.m.Write(pb.WriteRequest(collection="gl", ops=[
            pb.WriteOp(put=d2, expect_version=1),
            pb.WriteOp(put=make_doc(self.rng, 6, tokens=1)[0]),
            pb.WriteOp(put=make_doc(self.rng, 7, tokens=1)[0])]))
        self.assertEqual(list(w2.versions), [2, 1, 1])
        self.assertEqual(w2.commit_seq, w1.commit_seq + 1)
        g = self.m.Get(pb.GetRequest(collection="gl", ids=[7, 5], with_text=True, with_metadata=True,
                                     with_tensors=True, min_seq=w2.commit_seq))
        self.assertEqual([r.info.id for r in g.records], [7, 5])
        r5 = g.records[1]
        self.assertEqual(r5.info.version, 2)
        self.assertEqual(r5.info.tokens, 4)
        self.assertEqual(r5.info.chunks, 1)
        self.assertEqual(r5.document.text, "doc 5")
        self.assertEqual({l.layer for l in r5.document.layers}, set(LAYERS))
        for l in r5.document.layers:
            np.testing.assert_array_equal(from_tensor(l.k), kv2[l.layer][0])
            np.testing.assert_array_equal(from_tensor(l.v), kv2[l.layer][1])
        g = self.m.Get(pb.GetRequest(collection="gl", ids=[5], with_text=True, with_metadata=True,
                                     layers=[7], with_tensors=True))
        self.assertEqual([l.layer for l in g.records[0].document.layers], [7])
        page = self.m.List(pb.ListRequest(collection="gl", limit=2))
        self.assertEqual([x.id for x in page.documents], [5, 6])
        self.assertEqual(page.next_after_id, 6)
        page = self.m.List(pb.ListRequest(collection="gl", after_id=6, limit=2))
        self.assertEqual([x.id for x in page.documents], [7])
        self.assertEqual(page.next_after_id, 0)
        # Deletes, then NOT_FOUND.
        self.m.Write(pb.WriteRequest(collection="gl", ops=[pb.WriteOp(delete_id=6)]))
        self.assertCode(SC.NOT_FOUND, self.m.Get, pb.GetRequest(collection="gl", ids=[6]))
        self.assertCode(SC.NOT_FOUND, self.m.Write,
                        pb.WriteRequest(collection="gl", ops=[pb.WriteOp(delete_id=6)]))

    # -- status codes
    def test_invalid_argument(self):
        self.create("inv")
        ok_doc = make_doc(self.rng, 1, tokens=4)[0]
        # Wrong shape: the message names the field.
        bad = pb.Document()
        bad.CopyFrom(ok_doc)
        bad.layers[1].k.CopyFrom(tensor(np.zeros((1, H, D + 1), np.float32)))
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write,
                        pb.WriteRequest(collection="inv", ops=[pb.WriteOp(put=ok_doc), pb.WriteOp(put=bad)]),
                        contains="ops[1].put.layers[1].k")
        # NaN in a tensor.
        nan = pb.Document()
        nan.CopyFrom(ok_doc)
        k = np.zeros((1, H, D), np.float32)
        k[0, 1, 2] = np.nan
        nan.layers[0].k.CopyFrom(tensor(k))
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write,
                        pb.WriteRequest(collection="inv", ops=[pb.WriteOp(put=nan)]), contains="ops[0]")
        # Unknown enum value in a tensor dtype (protobuf-c keeps the int).
        unk = pb.Document()
        unk.CopyFrom(ok_doc)
        unk.layers[0].v.dtype = 9
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write,
                        pb.WriteRequest(collection="inv", ops=[pb.WriteOp(put=unk)]),
                        contains="ops[0].put.layers[0].v.dtype")
        # Unknown enum value in a schema.
        self.assertCode(SC.INVALID_ARGUMENT, self.m.CreateCollection,
                        pb.CreateCollectionRequest(name="x", schema=schema(similarity=7)),
                        contains="schema.similarity")
        self.assertCode(SC.INVALID_ARGUMENT, self.m.CreateCollection,
                        pb.CreateCollectionRequest(name="x", schema=schema(query_heads=3)),
                        contains="schema.query_heads")
        self.assertCode(SC.INVALID_ARGUMENT, self.m.CreateCollection,
                        pb.CreateCollectionRequest(name="bad/name", schema=schema()), contains="name")
        # Id 0, tokens 0.
        z = pb.Document()
        z.CopyFrom(ok_doc)
        z.id = 0
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write,
                        pb.WriteRequest(collection="inv", ops=[pb.WriteOp(put=z)]), contains="id")
        # top_k > 1024; unknown out_dtype.
        q = tensor(np.ones((1, HQ, D), np.float32))
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Route,
                        pb.RouteRequest(collection="inv", layers=[pb.LayerQuery(layer=3, routing_q=q)],
                                        top_k=2000), contains="top_k")
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Attend,
                        pb.AttendRequest(collection="inv", out_dtype=12,
                                         layers=[pb.LayerQuery(layer=3, routing_q=q, q=q)]),
                        contains="out_dtype")
        # Layer not in the schema.
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Route,
                        pb.RouteRequest(collection="inv", layers=[pb.LayerQuery(layer=4, routing_q=q)]),
                        contains="layer")
        # Malformed bytes.
        ch = self.d.channel()
        self.assertCode(SC.INVALID_ARGUMENT, raw_call, ch, "/msa.v1.Memory/Write",
                        b"\x0a\xff\xff\xff\xff\x0f", contains="malformed")
        # Nothing was written by any of the above.
        self.assertEqual(self.m.DescribeCollection(pb.DescribeCollectionRequest(name="inv")).documents, 0)

    def test_garbage_to_every_method(self):
        """Random bytes to every method: an error status (or, for bytes that
        happen to parse, an answer), never a crash."""
        ch = self.d.channel()
        rng = np.random.default_rng(77)
        methods = ["/msa.v1.Memory/" + n for n in (
            "CreateCollection", "DropCollection", "ListCollections", "DescribeCollection", "Write",
            "Get", "List", "Route", "Attend", "Stats")] + ["/msa.v1.Admin/Verify",
                                                          "/grpc.health.v1.Health/Check"]
        allowed = {SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.FAILED_PRECONDITION, SC.ALREADY_EXISTS}
        for meth in methods:
            for _ in range(15):
                payload = rng.integers(0, 256, size=int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
                try:
                    raw_call(ch, meth, payload)
                except grpc.RpcError as e:
                    self.assertIn(e.code(), allowed, "%s: %s" % (meth, e.details()))
        self.d.wait_healthy()

    def test_not_found(self):
        q = tensor(np.ones((1, HQ, D), np.float32))
        self.assertCode(SC.NOT_FOUND, self.m.Write, pb.WriteRequest(
            collection="missing", ops=[pb.WriteOp(put=make_doc(self.rng, 1, 4)[0])]))
        self.assertCode(SC.NOT_FOUND, self.m.Route, pb.RouteRequest(
            collection="missing", layers=[pb.LayerQuery(layer=3, routing_q=q)]))
        self.create("nf")
        self.m.Write(pb.WriteRequest(collection="nf", ops=[pb.WriteOp(put=make_doc(self.rng, 1, 4)[0])]))
        self.assertCode(SC.NOT_FOUND, self.m.Get, pb.GetRequest(collection="nf", ids=[1, 2]))
        self.assertCode(SC.NOT_FOUND, self.m.Attend, pb.AttendRequest(
            collection="nf", doc_ids=[1, 99], layers=[pb.LayerQuery(layer=3, routing_q=q, q=q)]))

    def test_already_exists_and_preconditions(self):
        self.create("pre", model="enc@1")
        d = make_doc(self.rng, 1, 4)[0]
        self.m.Write(pb.WriteRequest(collection="pre", ops=[pb.WriteOp(put=d, expect_absent=True)]))
        self.assertCode(SC.ALREADY_EXISTS, self.m.Write, pb.WriteRequest(
            collection="pre", ops=[pb.WriteOp(put=d, expect_absent=True)]))
        self.assertCode(SC.FAILED_PRECONDITION, self.m.Write, pb.WriteRequest(
            collection="pre", ops=[pb.WriteOp(put=d, expect_version=5)]))
        self.assertCode(SC.FAILED_PRECONDITION, self.m.Write, pb.WriteRequest(
            collection="pre", model="other@2", ops=[pb.WriteOp(put=d)]), contains="model")
        q = tensor(np.ones((1, HQ, D), np.float32))
        self.assertCode(SC.FAILED_PRECONDITION, self.m.Route, pb.RouteRequest(
            collection="pre", model="other@2", layers=[pb.LayerQuery(layer=3, routing_q=q)]))
        # A matching model is fine, and nothing above changed the document.
        self.m.Write(pb.WriteRequest(collection="pre", model="enc@1", ops=[pb.WriteOp(put=d, expect_version=1)]))
        g = self.m.Get(pb.GetRequest(collection="pre", ids=[1]))
        self.assertEqual(g.records[0].info.version, 2)

    def test_deadline_exceeded(self):
        self.create("dl")
        seq = self.m.Stats(pb.StatsRequest()).commit_seq
        q = tensor(np.ones((1, HQ, D), np.float32))
        req = pb.RouteRequest(collection="dl", layers=[pb.LayerQuery(layer=3, routing_q=q)],
                              min_seq=seq + 1000000)
        # A tiny client deadline: the server must give up too (deadline_ms
        # reaches the engine), so it counts a DEADLINE_EXCEEDED quickly.
        before = self._counter("status.DEADLINE_EXCEEDED")
        t0 = time.monotonic()
        self.assertCode(SC.DEADLINE_EXCEEDED, self.m.Route, req, timeout=0.3)
        for _ in range(100):
            if self._counter("status.DEADLINE_EXCEEDED") > before:
                break
            time.sleep(0.03)
        self.assertGreater(self._counter("status.DEADLINE_EXCEEDED"), before)
        self.assertLess(time.monotonic() - t0, 4.0)
        # min_seq never reached: the server's own 5 s limit. Meanwhile other
        # calls, writes included, are served without waiting for it.
        res = {}

        def slow():
            t = time.monotonic()
            try:
                self.m.Route(req, timeout=30)
            except grpc.RpcError as e:
                res["code"] = e.code()
            res["s"] = time.monotonic() - t

        th = threading.Thread(target=slow)
        th.start()
        time.sleep(0.2)
        t1 = time.monotonic()
        self.m.Write(pb.WriteRequest(collection="dl", ops=[pb.WriteOp(put=make_doc(self.rng, 1, 4)[0])]))
        self.m.ListCollections(pb.ListCollectionsRequest())
        self.assertLess(time.monotonic() - t1, 2.0)
        th.join(30)
        self.assertEqual(res.get("code"), SC.DEADLINE_EXCEEDED)
        self.assertGreater(res["s"], 3.0)

    def _counter(self, key):
        return self.m.Stats(pb.StatsRequest()).counters.get(key, 0)

    # -- ops surface
    def test_stats_counters(self):
        s = self.m.Stats(pb.StatsRequest())
        self.assertEqual(s.backend, "cpu")
        self.assertTrue(s.version)
        self.assertGreaterEqual(s.counters["requests.Stats"], 0)
        self.assertIn("requests.Write", s.counters)
        self.assertIn("errors.Route", s.counters)
        self.assertGreaterEqual(len(s.devices), 1)
        s2 = self.m.Stats(pb.StatsRequest())
        self.assertGreater(s2.counters["requests.Stats"], s.counters["requests.Stats"])

    def test_metrics_endpoint(self):
        text = self.d.metrics_text()
        self.assertIn('msad_requests_total{method="Write",code="OK"}', text)
        self.assertIn("# TYPE msad_request_duration_seconds histogram", text)
        self.assertIn('msad_request_duration_seconds_bucket{method="Route",le="+Inf"}', text)
        self.assertIn("msad_commit_seq ", text)
        self.assertIn("msad_documents ", text)
        self.assertIn("msad_index_bytes ", text)
        self.assertIn('msad_errors_total{code="NOT_FOUND"}', text)
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                float(value)   # every sample parses

    def test_every_stats_counter_has_a_metric(self):
        # The rule is check_stats_metrics's (tests/daemon_util.py); the lists
        # it checks live once in rpc/rpc_lists.h.
        s = check_stats_metrics(self, self.m, self.d.metrics_text)
        self.assertIn("engine.snapshot_leases_granted", s.counters)

    def test_unix_socket(self):
        self.assertTrue(any(a.startswith("unix:") for a in self.d.addrs))
        mode = stat.S_IMODE(os.stat(self.sock).st_mode)
        self.assertEqual(mode, 0o660)
        ch = self.d.channel(1)
        r = self.d.health(ch).Check(hpb.HealthCheckRequest(), timeout=10)
        self.assertEqual(r.status, hpb.HealthCheckResponse.SERVING)
        self.d.memory(ch).ListCollections(pb.ListCollectionsRequest(), timeout=10)

    def test_backup_verify(self):
        self.create("bk")
        self.m.Write(pb.WriteRequest(collection="bk", ops=[pb.WriteOp(put=make_doc(self.rng, 1, 4)[0])]))
        v = self.a.Verify(pb.VerifyRequest())
        self.assertEqual(list(v.problems), [])
        self.assertGreaterEqual(v.documents_checked, 1)
        self.assertEqual(list(self.a.Verify(pb.VerifyRequest(collection="bk")).problems), [])
        b = self.a.Backup(pb.BackupRequest(name="b1", compact=True))
        self.assertGreater(b.bytes, 0)
        self.assertGreater(b.snapshot_seq, 0)
        self.assertTrue(os.path.exists(os.path.join(self.backups, "b1")))
        self.assertCode(SC.INVALID_ARGUMENT, self.a.Backup, pb.BackupRequest(name="../x"))
        self.assertCode(SC.INVALID_ARGUMENT, self.a.Backup, pb.BackupRequest(name="a/b"))


# ==== limits and auth ==================================================================

class TestLimits(DaemonCase):
    def test_message_limit(self):
        with Daemon(args=["--max-message-mb", "1"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="big", schema=schema()))
            rng = np.random.default_rng(5)
            # Request over the limit.
            big, _ = make_doc(rng, 1, tokens=4)
            big.text = "x" * (1 << 20)
            self.assertCode(SC.RESOURCE_EXHAUSTED, m.Write,
                            pb.WriteRequest(collection="big", ops=[pb.WriteOp(put=big)]))
            # Response over the limit: several documents each under it.
            for i in range(1, 5):
                d0, _ = make_doc(rng, i, tokens=4)
                d0.text = "y" * 400000
                m.Write(pb.WriteRequest(collection="big", ops=[pb.WriteOp(put=d0)]))
            self.assertCode(SC.RESOURCE_EXHAUSTED, m.Get,
                            pb.GetRequest(collection="big", ids=[1, 2, 3, 4], with_text=True),
                            contains="message limit")
            self.assertEqual(len(m.Get(pb.GetRequest(collection="big", ids=[1], with_text=True)).records), 1)

    def test_busy_resource_exhausted(self):
        # One handler, one queue slot: a third concurrent call is refused.
        with Daemon(args=["--handlers", "1", "--max-queue", "1"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="busy", schema=schema()))
            q = tensor(np.ones((1, HQ, D), np.float32))
            slow = pb.RouteRequest(collection="busy", layers=[pb.LayerQuery(layer=3, routing_q=q)],
                                   min_seq=10 ** 6)
            futs = [m.Route.future(slow, timeout=4) for _ in range(2)]
            # Wait (polling, not sleeping a fixed time: CI hosts are slow) until
            # the two slow calls hold the handler and the queue slot.
            deadline = time.monotonic() + 3
            while True:
                try:
                    m.ListCollections(pb.ListCollectionsRequest())
                except grpc.RpcError as e:
                    self.assertEqual(e.code(), SC.RESOURCE_EXHAUSTED)
                    self.assertIn("too many concurrent requests", e.details())
                    break
                self.assertLess(time.monotonic(), deadline, "the slow calls never filled the queue")
                time.sleep(0.02)
            for f in futs:
                self.assertEqual(f.exception().code(), SC.DEADLINE_EXCEEDED)
            # Health is answered on the poller, never queued.
            d.health().Check(hpb.HealthCheckRequest(), timeout=5)
            # The server gives up on the slow calls at their deadlines (a hair
            # after the client does); then it serves again.
            for _ in range(100):
                try:
                    m.ListCollections(pb.ListCollectionsRequest())
                    break
                except grpc.RpcError as e:
                    self.assertEqual(e.code(), SC.RESOURCE_EXHAUSTED)
                    time.sleep(0.05)
            else:
                self.fail("still busy after the slow calls' deadlines")

    def test_busy_queue_bytes(self):
        # One handler held by a slow call; queued requests may hold 1 MiB of
        # request bytes: a 0.7 MB Write queues, the next one is refused by name,
        # and the queued one completes once the handler is free. Progress is
        # read from /metrics (Stats itself would queue behind the slow call).
        with Daemon(args=["--handlers", "1", "--max-queue", "100", "--max-queue-mb", "1"],
                    metrics=True) as d:
            m = d.memory()

            def gauge(name):
                text = urllib.request.urlopen("http://%s/metrics" % d.metrics_addr,
                                              timeout=5).read().decode()
                return float(re.search(r"^%s (\S+)$" % name, text, re.M).group(1))

            def wait_for(name, above, what):
                deadline = time.monotonic() + 5
                while gauge(name) <= above:
                    self.assertLess(time.monotonic(), deadline, what)
                    time.sleep(0.02)

            m.CreateCollection(pb.CreateCollectionRequest(name="qb", schema=schema()))
            q = tensor(np.ones((1, HQ, D), np.float32))
            slow = pb.RouteRequest(collection="qb", layers=[pb.LayerQuery(layer=3, routing_q=q)],
                                   min_seq=10 ** 6)
            f_slow = m.Route.future(slow, timeout=3)
            wait_for("msad_inflight_requests", 0, "the slow call never arrived")

            def big(i):
                doc, _ = make_doc(np.random.default_rng(i), i, 4, text="x" * 700000)
                return pb.WriteRequest(collection="qb", ops=[pb.WriteOp(put=doc)])
            f_queued = m.Write.future(big(1), timeout=30)
            wait_for("msad_queued_request_bytes", 600000, "the big write never queued")
            self.assertCode(SC.RESOURCE_EXHAUSTED, m.Write, big(2), timeout=10,
                            contains="--max-queue-mb")
            self.assertEqual(f_slow.exception().code(), SC.DEADLINE_EXCEEDED)
            self.assertGreater(f_queued.result().commit_seq, 0)
            self.assertEqual(gauge("msad_queued_request_bytes"), 0)

    def test_tls(self):
        import shutil
        if not shutil.which("openssl"):
            self.skipTest("openssl not installed")
        with tempfile.TemporaryDirectory() as tmp:
            crt, key = os.path.join(tmp, "s.crt"), os.path.join(tmp, "s.key")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                            "-keyout", key, "-out", crt], check=True, capture_output=True)
            with Daemon(args=["--tls-cert", crt, "--tls-key", key]) as d:
                with open(crt, "rb") as f:
                    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
                ch = grpc.secure_channel(d.addr, creds,
                                         options=[("grpc.ssl_target_name_override", "localhost")])
                try:
                    r = hpb_grpc.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=10)
                    self.assertEqual(r.status, hpb.HealthCheckResponse.SERVING)
                    pb_grpc.MemoryStub(ch).ListCollections(pb.ListCollectionsRequest(), timeout=10)
                finally:
                    ch.close()
                # Plaintext clients cannot talk to it.
                self.assertCode(SC.UNAVAILABLE, d.health().Check, hpb.HealthCheckRequest(), timeout=3)

    def test_auth_scopes(self):
        with tempfile.TemporaryDirectory() as tmp:
            tf = os.path.join(tmp, "tokens")
            with open(tf, "w") as f:
                f.write("# test tokens\nrtok read\n\nwtok write\natok   admin  # ops\n")
            os.chmod(tf, 0o600)
            with Daemon(args=["--tokens-file", tf]) as d:
                m = d.memory()
                md = lambda t: [("authorization", "Bearer " + t)]  # noqa: E731
                lc = pb.ListCollectionsRequest()
                self.assertCode(SC.UNAUTHENTICATED, m.ListCollections, lc)
                self.assertCode(SC.UNAUTHENTICATED, m.ListCollections, lc, metadata=md("nope"))
                self.assertCode(SC.UNAUTHENTICATED, m.ListCollections, lc,
                                metadata=[("authorization", "Basic cnRvaw==")])
                m.ListCollections(lc, metadata=md("rtok"))
                # Health needs no token.
                d.health().Check(hpb.HealthCheckRequest())
                cc = pb.CreateCollectionRequest(name="auth", schema=schema())
                self.assertCode(SC.PERMISSION_DENIED, m.CreateCollection, cc, metadata=md("rtok"))
                self.assertCode(SC.PERMISSION_DENIED, m.CreateCollection, cc, metadata=md("wtok"))
                m.CreateCollection(cc, metadata=md("atok"))
                w = pb.WriteRequest(collection="auth",
                                    ops=[pb.WriteOp(put=make_doc(np.random.default_rng(1), 1, 4)[0])])
                self.assertCode(SC.PERMISSION_DENIED, m.Write, w, metadata=md("rtok"))
                m.Write(w, metadata=md("wtok"))
                m.Write(w, metadata=md("atok"))
                m.Get(pb.GetRequest(collection="auth", ids=[1]), metadata=md("rtok"))
                self.assertCode(SC.PERMISSION_DENIED, d.admin().Verify, pb.VerifyRequest(),
                                metadata=md("wtok"))
                d.admin().Verify(pb.VerifyRequest(), metadata=md("atok"))


# ==== restart, shutdown ==================================================================

class TestLifecycle(DaemonCase):
    def test_restart_keeps_everything(self):
        rng = np.random.default_rng(9)
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(tmp=tmp)
            d.start()
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="keep", schema=schema(model="enc@1")))
            ops = [pb.WriteOp(put=make_doc(rng, i, tokens=i + 2, meta=b"m%d" % i)[0]) for i in range(1, 7)]
            m.Write(pb.WriteRequest(collection="keep", ops=ops))
            m.Write(pb.WriteRequest(collection="keep", ops=[pb.WriteOp(delete_id=3)]))
            q = tensor(rng.standard_normal((2, HQ, D)).astype(np.float32))
            rq = pb.RouteRequest(collection="keep", layers=[pb.LayerQuery(layer=l, routing_q=q) for l in LAYERS])
            gq = pb.GetRequest(collection="keep", ids=[1, 2, 4, 5, 6], with_text=True, with_metadata=True,
                               with_tensors=True)
            before = (m.DescribeCollection(pb.DescribeCollectionRequest(name="keep")), m.Route(rq), m.Get(gq),
                      m.Stats(pb.StatsRequest()).commit_seq)
            self.assertEqual(d.stop(), 0)
            d.start()
            m = d.memory()
            after = (m.DescribeCollection(pb.DescribeCollectionRequest(name="keep")), m.Route(rq), m.Get(gq),
                     m.Stats(pb.StatsRequest()).commit_seq)
            self.assertEqual(before[0], after[0])
            self.assertEqual(before[1], after[1])
            self.assertEqual(before[2], after[2])
            self.assertEqual(before[3], after[3])
            self.assertEqual(list(d.admin().Verify(pb.VerifyRequest()).problems), [])
            self.assertEqual(d.stop(), 0)
            d.cleanup()

    def test_sigterm_under_load_loses_no_ack(self):
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(tmp=tmp)
            d.start()
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="load", schema=schema()))
            acked, attempted = set(), set()
            lock = threading.Lock()
            stop = threading.Event()
            errors, last_codes = [], []

            def writer(w):
                rng = np.random.default_rng(100 + w)
                ch = d.channel()
                mm = d.memory(ch)
                i = 0
                while not stop.is_set():
                    i += 1
                    ids = [w * 1000000 + i * 10 + j for j in range(3)]
                    with lock:
                        attempted.update(ids)
                    ops = [pb.WriteOp(put=make_doc(rng, x, tokens=5)[0]) for x in ids]
                    try:
                        mm.Write(pb.WriteRequest(collection="load", ops=ops), timeout=20)
                    except grpc.RpcError as e:
                        last_codes.append(e.code())
                        if e.code() not in (SC.UNAVAILABLE, SC.CANCELLED):
                            errors.append((e.code(), e.details()))
                        return
                    with lock:
                        acked.update(ids)

            threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            rc = d.stop(timeout=60)
            stop.set()
            for t in threads:
                t.join(30)
            self.assertEqual(rc, 0, d.log_tail())
            self.assertEqual(errors, [])
            self.assertGreater(len(acked), 0)
            if os.environ.get("MSA_TEST_VERBOSE"):
                print("acked %d attempted %d last codes %s" % (len(acked), len(attempted), last_codes))
            d.start()
            m = d.memory()
            present, after = set(), 0
            while True:
                page = m.List(pb.ListRequest(collection="load", after_id=after, limit=1000))
                present.update(x.id for x in page.documents)
                if not page.next_after_id:
                    break
                after = page.next_after_id
            self.assertEqual(acked - present, set(), "acknowledged writes lost")
            self.assertEqual(present - attempted, set())
            # Requests are atomic: each request's 3 ids are all there or none.
            for x in present:
                base = x - x % 10
                self.assertTrue({base, base + 1, base + 2} <= present)
            self.assertEqual(list(d.admin().Verify(pb.VerifyRequest()).problems), [])
            self.assertEqual(d.stop(), 0)
            d.cleanup()

    def test_unavailable_during_shutdown(self):
        with Daemon() as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="sd", schema=schema()))
            q = tensor(np.ones((1, HQ, D), np.float32))
            slow = pb.RouteRequest(collection="sd", layers=[pb.LayerQuery(layer=3, routing_q=q)],
                                   min_seq=10 ** 6)
            res = {}

            def in_flight():
                try:
                    m.Route(slow, timeout=2.5)
                except grpc.RpcError as e:
                    res["code"] = e.code()

            t = threading.Thread(target=in_flight)
            t.start()
            time.sleep(0.3)          # the call is inside the engine, waiting
            d.signal(signal.SIGTERM)
            time.sleep(0.3)
            # New calls on the same connection, while the old one finishes.
            self.assertCode(SC.UNAVAILABLE, m.ListCollections, pb.ListCollectionsRequest(), timeout=5,
                            contains="shutting down")
            self.assertEqual(d.health().Check(hpb.HealthCheckRequest(), timeout=5).status,
                             hpb.HealthCheckResponse.NOT_SERVING)
            t.join(10)
            # The in-flight call ran to its own end, not cut by the shutdown.
            self.assertEqual(res.get("code"), SC.DEADLINE_EXCEEDED)
            self.assertEqual(d.stop(), 0)


# ==== the command line ======================================================================

class TestCommandLine(DaemonCase):
    def run_msad(self, *args, timeout=20):
        return subprocess.run([msad_path()] + list(args), capture_output=True, timeout=timeout, text=True)

    def test_version_help(self):
        r = self.run_msad("--version")
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"^msad \d+\.\d+\.\d+")
        r = self.run_msad("--help")
        self.assertEqual(r.returncode, 0)
        for flag in ("--data", "--listen", "--backend", "--threads", "--tokens-file", "--tls-cert",
                     "--backup-dir", "--max-message-mb", "--sync", "--metrics", "--log-level",
                     "--log-format", "--config"):
            self.assertIn(flag, r.stdout)

    def test_bad_flags_exit_2(self):
        for args in (["--bogus"], ["--threads", "abc"], ["--backend", "tpu"], ["--sync", "maybe"],
                     ["--max-message-mb", "0"], ["--listen"], ["positional"], ["--tls-cert", "x"],
                     ["--log-format", "xml"], ["--config", "/nonexistent/msad.conf"]):
            r = self.run_msad(*args)
            self.assertEqual(r.returncode, 2, "%s: %s" % (args, r.stderr))
            self.assertIn("msad:", r.stderr)

    def test_bad_tokens_file_exit_2(self):
        with tempfile.TemporaryDirectory() as tmp:
            tf = os.path.join(tmp, "t")
            with open(tf, "w") as f:
                f.write("tok superuser\n")
            r = self.run_msad("--data", os.path.join(tmp, "d"), "--tokens-file", tf, "--listen", "127.0.0.1:0")
            self.assertEqual(r.returncode, 2)
            self.assertIn(":1:", r.stderr)

    def test_config_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            conf = os.path.join(tmp, "msad.conf")
            with open(conf, "w") as f:
                f.write("# sample\nlisten = 127.0.0.1:0\nmax-message-mb = 1\nlog-format = json\n"
                        "data = %s\n" % os.path.join(tmp, "from-config"))
            d = Daemon(tmp=tmp, data_dir=os.path.join(tmp, "from-flag"), listen=["127.0.0.1:0"],
                       args=["--config", conf])
            d.start()
            try:
                # --data given as a flag wins over the file.
                self.assertTrue(os.path.isdir(os.path.join(tmp, "from-flag")))
                self.assertFalse(os.path.exists(os.path.join(tmp, "from-config")))
                # max-message-mb = 1 from the file applies.
                m = d.memory()
                self.assertCode(SC.RESOURCE_EXHAUSTED, m.CreateCollection, pb.CreateCollectionRequest(
                    name="x" * 10, schema=schema(model="m" * (2 << 20))))
            finally:
                self.assertEqual(d.stop(), 0)
            with open(os.path.join(tmp, "msad.log")) as f:
                self.assertIn('"level"', f.read())   # json log lines
            with open(conf, "a") as f:
                f.write("no-such-key = 1\n")
            r = self.run_msad("--config", conf)
            self.assertEqual(r.returncode, 2)
            self.assertIn("no-such-key", r.stderr)

    def test_store_locked_exit_1(self):
        with Daemon() as d:
            r = self.run_msad("--data", d.data_dir, "--listen", "127.0.0.1:0")
            self.assertEqual(r.returncode, 1, r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
