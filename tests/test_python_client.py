"""The Python package msa_client (build/python) against a real msad on loopback.

Round-trips collections and documents through the NumPy wrapper (f32/bf16/f16
conversion, raw pooling, router keys), checks route/attend against an fp64 reference
computed here, the batch splitting of put_many under a 1 MiB server limit, errors as
MsaError with the gRPC status, and the admin calls.

Run: ~/.cache/msad/venv/bin/python tests/test_python_client.py. MSA_BIN = build/bin; the package is
taken from $MSA_PYTHON or MSA_BIN/../python. Exits 77 when msad or the package is absent.
"""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import BIN, Daemon, msad_path  # noqa: E402

PYDIR = os.environ.get("MSA_PYTHON") or os.path.join(os.path.dirname(os.path.abspath(BIN)), "python")
if not os.access(msad_path(), os.X_OK) or not os.path.exists(os.path.join(PYDIR, "msa_client", "memory_pb2.py")):
    print("skip: msad or the msa_client package (%s) not built" % PYDIR)
    sys.exit(77)
sys.path.insert(0, PYDIR)

import grpc  # noqa: E402

import msa_client  # noqa: E402
from msa_client import Client, MsaError, bf16_bits_to_f32, f32_to_bf16_bits  # noqa: E402

H, HQ, D, P = 2, 4, 8, 4
LAYERS = [0, 2]


def ref_route(q, keys, top_k, exclude=()):
    """COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX in float64 over {id: K [C, H, D]}."""
    q = np.asarray(q, np.float64)
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    sc = {}
    for did, k in keys.items():
        if did in exclude:
            continue
        k = np.asarray(k, np.float64)
        kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
        kj = kn[:, np.arange(HQ) // (HQ // H)]
        sc[did] = np.einsum("tjd,cjd->tjc", qn, kj).mean(axis=1).max()
    return sorted(sc.items(), key=lambda p: (-p[1], p[0]))[:top_k]


def ref_attend(q, ks, vs, scale=None):
    q = np.asarray(q, np.float64)
    K = np.concatenate(ks).astype(np.float64)[:, np.arange(HQ) // (HQ // H)]
    V = np.concatenate(vs).astype(np.float64)[:, np.arange(HQ) // (HQ // H)]
    logit = (scale or 1 / np.sqrt(D)) * np.einsum("tjd,rjd->tjr", q, K)
    m = logit.max(axis=2, keepdims=True)
    e = np.exp(logit - m)
    s = e.sum(axis=2, keepdims=True)
    return np.einsum("tjr,rjd->tjd", e / s, V), (m + np.log(s))[..., 0]


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(args=["--max-message-mb", "1", "--backend", "cpu", "--threads", "2"]).start()
        cls.c = Client(cls.d.addr, timeout=30)
        cls.rng = np.random.default_rng(3)

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        try:
            cls.d.stop()
        finally:
            cls.d.cleanup()

    def rand(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def test_conversions(self):
        x = np.array([0, 1, -1.5, 3.14159265, 1.00390625, 1.0078125, 1e-30, 65504], np.float32)
        b = f32_to_bf16_bits(x)
        self.assertEqual(b.dtype, np.uint16)
        self.assertEqual(int(b[1]), 0x3F80)
        self.assertEqual(int(b[4]), 0x3F80)   # tie to even (down)
        self.assertEqual(int(b[5]), 0x3F81)   # exact
        np.testing.assert_allclose(bf16_bits_to_f32(b), x, rtol=4e-3)
        self.assertTrue(hasattr(msa_client.memory_pb2, "WriteRequest"))
        self.assertTrue(hasattr(msa_client.memory_pb2_grpc, "MemoryStub"))

    def test_collections(self):
        info = self.c.create_collection("pc", layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                                        chunk_tokens=P, kv_dtype="f16", routing_dtype="i8",
                                        head_reduce="max", query_reduce="last", chunk_reduce="mean",
                                        similarity="dot", default_top_k=3, model="enc@1")
        s = info["schema"]
        self.assertEqual((info["name"], s["layers"], s["kv_dtype"], s["routing_dtype"]), ("pc", LAYERS, "F16", "I8"))
        self.assertEqual((s["head_reduce"], s["query_reduce"], s["chunk_reduce"], s["similarity"]),
                         ("HEAD_MAX", "QUERY_LAST", "CHUNK_MEAN", "DOT"))
        self.assertEqual(self.c.describe("pc")["schema"]["model"], "enc@1")
        self.assertIn("pc", [x["name"] for x in self.c.list_collections()])
        with self.assertRaises(MsaError) as e:
            self.c.create_collection("pc", layers=[0], kv_heads=1, query_heads=1, head_dim=4)
        self.assertEqual(e.exception.code, grpc.StatusCode.ALREADY_EXISTS)
        self.assertEqual(e.exception.name, "ALREADY_EXISTS")
        with self.assertRaises(MsaError) as e:
            self.c.create_collection("bad", layers=[0], kv_heads=3, query_heads=4, head_dim=4)
        self.assertEqual(e.exception.name, "INVALID_ARGUMENT")
        self.assertIn("query_heads", e.exception.details)
        # model mismatch on write
        with self.assertRaises(MsaError) as e:
            self.c.put("pc", 1, {l: (self.rand(1, H, D), self.rand(1, H, D)) for l in LAYERS}, model="other")
        self.assertEqual(e.exception.name, "FAILED_PRECONDITION")
        self.assertGreater(self.c.drop_collection("pc"), 0)
        with self.assertRaises(MsaError) as e:
            self.c.describe("pc")
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)

    def test_text_with_nul_byte_exact(self):
        # Issue 17: text was cut at its first NUL ("before\0after" stored as
        # "before"); it is stored and returned byte-exact with its length.
        self.c.create_collection("nul", layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                                 chunk_tokens=P)
        kv = {l: (self.rand(1, H, D), self.rand(1, H, D)) for l in LAYERS}
        text, meta = "before\0after \u00e9\0", b"m\x00eta\x00"
        self.c.put("nul", 5, kv, tokens=2, text=text, metadata=meta)
        g = self.c.get("nul", 5, with_tensors=False)
        self.assertEqual((g["text"], g["metadata"]), (text, meta))
        self.assertEqual(g["info"]["text_bytes"], len(text.encode()))

    def test_roundtrip_dtypes(self):
        self.c.create_collection("bf", layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D, chunk_tokens=P,
                                 separate_router_keys=True)
        kv = {l: (self.rand(3, H, D), self.rand(3, H, D), self.rand(3, H, D)) for l in LAYERS}
        r = self.c.put("bf", 11, kv, tokens=10, text="héllo", metadata=b"\x00\xff")
        self.assertEqual(r["version"], 1)
        g = self.c.get("bf", 11)
        self.assertEqual((g["id"], g["text"], g["metadata"]), (11, "héllo", b"\x00\xff"))
        self.assertEqual((g["info"]["tokens"], g["info"]["chunks"], g["info"]["version"]), (10, 3, 1))
        for l in LAYERS:
            e = g["layers"][l]
            self.assertEqual(e["dtype"], "BF16")
            for i, name in enumerate(("k", "v", "router_k")):
                self.assertEqual(e[name].dtype, np.float32)
                np.testing.assert_array_equal(e[name], bf16_bits_to_f32(f32_to_bf16_bits(kv[l][i])))
        # uint16 arrays are bf16 bits, sent unchanged; expect_version CAS
        bits = {l: (f32_to_bf16_bits(kv[l][0]), f32_to_bf16_bits(kv[l][1]), f32_to_bf16_bits(kv[l][2])) for l in LAYERS}
        self.assertEqual(self.c.put("bf", 11, bits, tokens=12, expect_version=1)["version"], 2)
        with self.assertRaises(MsaError) as e:
            self.c.put("bf", 11, bits, tokens=12, expect_version=1)
        self.assertEqual(e.exception.name, "FAILED_PRECONDITION")
        with self.assertRaises(MsaError) as e:
            self.c.put("bf", 11, bits, tokens=12, expect_absent=True)
        self.assertEqual(e.exception.name, "ALREADY_EXISTS")
        g = self.c.get("bf", [11], with_text=False, layers=[LAYERS[1]])[0]
        self.assertNotIn("text", g)
        self.assertEqual(list(g["layers"]), [LAYERS[1]])
        np.testing.assert_array_equal(g["layers"][LAYERS[1]]["router_k"], bf16_bits_to_f32(bits[LAYERS[1]][2]))
        # skip_router_keys: the same K and V, no router_k, a third fewer tensor bytes
        from msa_client import memory_pb2 as pb
        full = self.c._mem.Get(pb.GetRequest(collection="bf", ids=[11], with_tensors=True))
        lean = self.c._mem.Get(pb.GetRequest(collection="bf", ids=[11], with_tensors=True,
                                             skip_router_keys=True))
        for lf, ll in zip(full.records[0].document.layers, lean.records[0].document.layers):
            self.assertEqual((lf.k, lf.v), (ll.k, ll.v))
            self.assertTrue(lf.router_k.data)
            self.assertFalse(ll.HasField("router_k") and ll.router_k.data)
        self.assertLess(lean.ByteSize(), full.ByteSize() * 0.7)
        g = self.c.get("bf", 11, router_keys=False)
        for l in LAYERS:
            self.assertEqual(sorted(k for k in g["layers"][l] if k != "dtype"), ["k", "v"])
            np.testing.assert_array_equal(g["layers"][l]["v"], bf16_bits_to_f32(bits[l][1]))
        # missing router_k in a separate-router-keys collection
        with self.assertRaises(MsaError) as e:
            self.c.put("bf", 12, {l: kv[l][:2] for l in LAYERS}, tokens=12)
        self.assertEqual(e.exception.name, "INVALID_ARGUMENT")

        # f16 collection, raw write pooled by the server from float32
        self.c.create_collection("f16raw", layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                                 chunk_tokens=P, kv_dtype="f16")
        raw = {l: (self.rand(9, H, D), self.rand(9, H, D)) for l in LAYERS}
        self.c.put("f16raw", 1, raw, raw=True)   # tokens = 9 rows
        g = self.c.get("f16raw", 1)
        self.assertEqual((g["info"]["tokens"], g["info"]["chunks"]), (9, 3))
        for l in LAYERS:
            pooled = np.stack([raw[l][0][c * P:(c + 1) * P].mean(axis=0) for c in range(3)])
            np.testing.assert_array_equal(g["layers"][l]["k"], pooled.astype(np.float16).astype(np.float32))

    def test_route_attend(self):
        self.c.create_collection("ra", layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                                 chunk_tokens=P, kv_dtype="f32", routing_dtype="f32")
        docs = {}
        for did in range(1, 10):
            c = 1 + did % 4
            docs[did] = {l: (self.rand(c, H, D), self.rand(c, H, D)) for l in LAYERS}
            self.c.put("ra", did, docs[did], tokens=c * P - (did % 2))
        T = 3
        rq = {l: self.rand(T, HQ, D) for l in LAYERS}
        q = {l: self.rand(T, HQ, D) for l in LAYERS}
        res = self.c.route("ra", rq, top_k=4, exclude_ids=[5])
        self.assertGreater(res.snapshot_seq, 0)
        for l in LAYERS:
            ids, scores = res[l]
            self.assertEqual((ids.dtype, scores.dtype), (np.uint64, np.float32))
            want = ref_route(rq[l], {d: docs[d][l][0] for d in docs}, 4, exclude=[5])
            self.assertEqual(list(ids), [w[0] for w in want])
            np.testing.assert_allclose(scores, [w[1] for w in want], atol=1e-4)
        # bf16 queries: the reference on the bf16-rounded queries
        res16 = self.c.route("ra", rq, top_k=3, query_dtype="bf16")
        for l in LAYERS:
            qb = bf16_bits_to_f32(f32_to_bf16_bits(rq[l])).reshape(rq[l].shape)
            want = ref_route(qb, {d: docs[d][l][0] for d in docs}, 3)
            self.assertEqual([int(x) for x in res16[l][0]], [w[0] for w in want])
            np.testing.assert_allclose(res16[l][1], [w[1] for w in want], atol=1e-4)

        att = self.c.attend("ra", {l: q[l] for l in LAYERS}, doc_ids=[2, 7])
        for l in LAYERS:
            a = att[l]
            self.assertEqual(sorted(int(x) for x in a.doc_ids), [2, 7])
            self.assertEqual(a.out.shape, (T, HQ, D))
            self.assertEqual(a.out.dtype, np.float32)
            ro, rl = ref_attend(q[l], [docs[2][l][0], docs[7][l][0]], [docs[2][l][1], docs[7][l][1]])
            np.testing.assert_allclose(a.out, ro, atol=1e-4)
            np.testing.assert_allclose(a.lse, rl, atol=1e-4)
        att = self.c.attend("ra", {l: (rq[l], q[l]) for l in LAYERS}, top_k=2, scale=0.25, out_dtype="f16")
        for l in LAYERS:
            want = [w[0] for w in ref_route(rq[l], {d: docs[d][l][0] for d in docs}, 2)]
            self.assertEqual([int(x) for x in att[l].doc_ids], want)
            ro, rl = ref_attend(q[l], [docs[d][l][0] for d in want], [docs[d][l][1] for d in want], 0.25)
            np.testing.assert_allclose(att[l].out, ro, atol=5e-3)
            np.testing.assert_allclose(att[l].lse, rl, atol=1e-4)
        with self.assertRaises(MsaError) as e:
            self.c.attend("ra", {LAYERS[0]: q[LAYERS[0]]}, doc_ids=[99])
        self.assertEqual(e.exception.name, "NOT_FOUND")
        with self.assertRaises(MsaError) as e:
            self.c.route("ra", {LAYERS[0]: rq[LAYERS[0]]}, top_k=2000)
        self.assertEqual(e.exception.name, "INVALID_ARGUMENT")

        # list / delete
        page, nxt = self.c.list_docs("ra", limit=4)
        self.assertEqual([d["id"] for d in page], [1, 2, 3, 4])
        self.assertEqual(nxt, 4)
        self.assertEqual([d["id"] for d in self.c.iter_docs("ra", page=2)], list(range(1, 10)))
        self.assertGreater(self.c.delete("ra", [3, 4]), 0)
        self.assertEqual([d["id"] for d in self.c.iter_docs("ra")], [1, 2, 5, 6, 7, 8, 9])
        with self.assertRaises(MsaError) as e:
            self.c.delete("ra", 3)
        self.assertEqual(e.exception.name, "NOT_FOUND")
        res = self.c.route("ra", rq, top_k=9)
        for l in LAYERS:
            self.assertNotIn(3, [int(x) for x in res[l][0]])
            self.assertEqual(len(res[l][0]), 7)

    def test_put_many_and_limits(self):
        self.c.create_collection("many", layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                                 chunk_tokens=P, kv_dtype="f32", routing_dtype="f32")
        # 300 docs x 32 chunks x 2 layers x (K, V) x 64 B = 2.4 MiB: over the 1 MiB limit
        docs = [self.c.document("many", i + 1, {l: (self.rand(32, H, D), self.rand(32, H, D)) for l in LAYERS},
                                tokens=128) for i in range(300)]
        with self.assertRaises(MsaError) as e:   # one request over the daemon's limit
            self.c.write("many", [msa_client.memory_pb2.WriteOp(put=d) for d in docs])
        self.assertEqual(e.exception.name, "RESOURCE_EXHAUSTED")
        self.assertEqual(self.c.describe("many")["documents"], 0)
        rs = self.c.put_many("many", docs, max_batch_bytes=900 << 10)
        self.assertGreaterEqual(len(rs), 3)
        self.assertEqual(sum(len(r.versions) for r in rs), 300)
        self.assertEqual([r.commit_seq for r in rs], sorted(r.commit_seq for r in rs))
        info = self.c.describe("many")
        self.assertEqual((info["documents"], info["tokens"]), (300, 300 * 128))

    def test_admin(self):
        self.c.create_collection("adm", layers=[0], kv_heads=1, query_heads=1, head_dim=4)
        st = self.c.stats()
        self.assertEqual(st["backend"], "cpu")
        self.assertGreater(st["commit_seq"], 0)
        self.assertTrue(st["version"])
        v = self.c.verify()
        self.assertEqual(v["problems"], [])
        self.assertEqual(self.c.health(), "SERVING")
        with self.assertRaises(MsaError) as e:   # no --backup-dir on this daemon
            self.c.backup("x")
        self.assertIn(e.exception.name, ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "UNIMPLEMENTED"))
        bad = Client("127.0.0.1:1", timeout=5)
        with self.assertRaises(MsaError) as e:
            bad.stats()
        self.assertEqual(e.exception.name, "UNAVAILABLE")
        bad.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
