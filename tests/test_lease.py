"""Held snapshots (snapshot leases) against a real msad on loopback.

A call with hold_snapshot_ms keeps the snapshot it read; later Route, Attend, Get and
List calls naming it in snapshot_seq must answer from exactly that world while other
commits replace, delete and insert documents. Every answer is checked against a float64
reference computed here from what was written (the v1 world for the held snapshot, the
current world for calls without snapshot_seq), never against the daemon's own output.
Also: release, expiry (the reaper closes an abandoned lease without any call), renewal,
shared leases on one seq, the --max-held-snapshots and --max-snapshot-hold-ms limits,
min_seq with snapshot_seq, several threads reading one held snapshot while a writer
writes, compaction keeping the versions a lease sees, and map growth revoking leases
instead of stalling the writer.

Run: /usr/bin/python3 tests/test_lease.py. MSA_BIN = build/bin; the package is taken
from $MSA_PYTHON or MSA_BIN/../python. Exits 77 when msad or the package is absent.
"""
import os
import sys
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import BIN, Daemon, msad_path  # noqa: E402

PYDIR = os.environ.get("MSA_PYTHON") or os.path.join(os.path.dirname(os.path.abspath(BIN)), "python")
if not os.access(msad_path(), os.X_OK) or not os.path.exists(os.path.join(PYDIR, "msa_client", "memory_pb2.py")):
    print("skip: msad or the msa_client package (%s) not built" % PYDIR)
    sys.exit(77)
sys.path.insert(0, PYDIR)

from msa_client import Client, MsaError  # noqa: E402

H, HQ, D, P = 2, 4, 8, 4
LAYERS = [0, 3]
MAX_HELD = 6
MAX_HOLD_MS = 20000


def ref_route(q, keys, top_k):
    """COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX in float64 over {id: K [C, H, D]}."""
    q = np.asarray(q, np.float64)
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    sc = {}
    for did, k in keys.items():
        k = np.asarray(k, np.float64)
        kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
        kj = kn[:, np.arange(HQ) // (HQ // H)]
        sc[did] = np.einsum("tjd,cjd->tjc", qn, kj).mean(axis=1).max()
    return sorted(sc.items(), key=lambda p: (-p[1], p[0]))[:top_k]


def ref_attend(q, ks, vs):
    q = np.asarray(q, np.float64)
    K = np.concatenate(ks).astype(np.float64)[:, np.arange(HQ) // (HQ // H)]
    V = np.concatenate(vs).astype(np.float64)[:, np.arange(HQ) // (HQ // H)]
    logit = (1 / np.sqrt(D)) * np.einsum("tjd,rjd->tjr", q, K)
    m = logit.max(axis=2, keepdims=True)
    e = np.exp(logit - m)
    s = e.sum(axis=2, keepdims=True)
    return np.einsum("tjr,rjd->tjd", e / s, V), (m + np.log(s))[..., 0]


class World:
    """What the test wrote: {id: {layer: (K, V)}} per version, as float32 (F32 storage)."""

    def __init__(self, rng):
        self.rng = rng
        self.docs = {}

    def rand(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def new_doc(self, chunks):
        return {l: (self.rand(chunks, H, D), self.rand(chunks, H, D)) for l in LAYERS}


class LeaseTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(args=["--backend", "cpu", "--threads", "2",
                             "--max-held-snapshots", str(MAX_HELD),
                             "--max-snapshot-hold-ms", str(MAX_HOLD_MS)]).start()
        cls.c = Client(cls.d.addr, timeout=30)
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        try:
            rc = cls.d.stop()
        finally:
            cls.d.cleanup()
        assert rc == 0, "msad exit code %r" % rc

    def collection(self, world, n_docs):
        LeaseTest.n += 1
        name = "lease%d" % LeaseTest.n
        self.c.create_collection(name, layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                                 chunk_tokens=P, kv_dtype="f32", routing_dtype="f32")
        for did in range(1, n_docs + 1):
            world.docs[did] = world.new_doc(1 + did % 3)
            self.c.put(name, did, world.docs[did], tokens=(1 + did % 3) * P)
        return name

    def counters(self):
        return self.c.stats()["counters"]

    def check_route(self, name, rq, docs, res, top_k):
        for l in LAYERS:
            want = ref_route(rq[l], {d: docs[d][l][0] for d in docs}, top_k)
            self.assertEqual([int(x) for x in res[l][0]], [w[0] for w in want])
            np.testing.assert_allclose(res[l][1], [w[1] for w in want], atol=1e-5)

    def check_attend(self, q, docs, ids, att_layer, l):
        ro, rl = ref_attend(q, [docs[d][l][0] for d in ids], [docs[d][l][1] for d in ids])
        np.testing.assert_allclose(att_layer.out, ro, atol=1e-5)
        np.testing.assert_allclose(att_layer.lse, rl, atol=1e-5)

    # ------------------------------------------------------------------------------
    def test_held_world(self):
        """Route/Get/Attend/List at a held seq see v1 while other commits move on."""
        w = World(np.random.default_rng(11))
        name = self.collection(w, 8)
        v1 = {d: dict(w.docs[d]) for d in w.docs}
        T = 3
        rq = {l: w.rand(T, HQ, D) for l in LAYERS}
        q = {l: w.rand(T, HQ, D) for l in LAYERS}
        c0 = self.counters()
        first = self.c.route(name, rq, top_k=8, hold_snapshot_ms=15000)
        S = first.snapshot_seq
        self.assertEqual(self.c.last_snapshot_seq, S)
        self.check_route(name, rq, v1, first, 8)

        # Other commits: replace 1 (v2), delete 2, insert 9; then churn 3..6 so the index
        # compacts (>= 1/4 of rows dead) while the lease still sees the old versions.
        now = {d: dict(v1[d]) for d in v1}
        now[1] = w.new_doc(2)
        self.assertEqual(self.c.put(name, 1, now[1], tokens=2 * P)["version"], 2)
        self.c.delete(name, 2)
        del now[2]
        now[9] = w.new_doc(3)
        self.c.put(name, 9, now[9], tokens=3 * P)
        for rnd in range(4):
            for did in (3, 4, 5, 6):
                now[did] = w.new_doc(1 + (did + rnd) % 3)
                self.c.put(name, did, now[did], tokens=(1 + (did + rnd) % 3) * P)
        self.assertGreater(self.c.stats()["commit_seq"], S + 10)

        # Route: held vs current.
        held = self.c.route(name, rq, top_k=8, snapshot_seq=S)
        self.assertEqual(held.snapshot_seq, S)
        self.check_route(name, rq, v1, held, 8)
        cur = self.c.route(name, rq, top_k=8)
        self.assertGreater(cur.snapshot_seq, S)
        self.check_route(name, rq, now, cur, 8)

        # Get: the v1 bytes of 1 and 2 (2 is deleted now), versions 1.
        recs = self.c.get(name, [1, 2, 5], snapshot_seq=S)
        self.assertEqual(recs.snapshot_seq, S)
        for rec in recs:
            did = rec["id"]
            self.assertEqual(rec["info"]["version"], 1)
            self.assertEqual(rec["snapshot_seq"], S)
            for l in LAYERS:
                np.testing.assert_array_equal(rec["layers"][l]["k"], v1[did][l][0])
                np.testing.assert_array_equal(rec["layers"][l]["v"], v1[did][l][1])
        with self.assertRaises(MsaError) as e:
            self.c.get(name, [2])
        self.assertEqual(e.exception.name, "NOT_FOUND")
        with self.assertRaises(MsaError) as e:
            self.c.get(name, [9], snapshot_seq=S)     # inserted after S
        self.assertEqual(e.exception.name, "NOT_FOUND")
        g = self.c.get(name, 1)
        self.assertEqual(g["info"]["version"], 2)
        np.testing.assert_array_equal(g["layers"][LAYERS[0]]["k"], now[1][LAYERS[0]][0])

        # Attend: given doc_ids (the decode path) and routed, at S.
        att = self.c.attend(name, {l: q[l] for l in LAYERS}, doc_ids=[1, 2], snapshot_seq=S)
        self.assertEqual(att.snapshot_seq, S)
        for l in LAYERS:
            self.check_attend(q[l], v1, [1, 2], att[l], l)
        att = self.c.attend(name, {l: (rq[l], q[l]) for l in LAYERS}, top_k=3, snapshot_seq=S)
        for l in LAYERS:
            ids = [x[0] for x in ref_route(rq[l], {d: v1[d][l][0] for d in v1}, 3)]
            self.assertEqual([int(x) for x in att[l].doc_ids], ids)
            self.check_attend(q[l], v1, ids, att[l], l)
        with self.assertRaises(MsaError) as e:
            self.c.attend(name, {l: q[l] for l in LAYERS}, doc_ids=[1, 2])   # 2 is gone now
        self.assertEqual(e.exception.name, "NOT_FOUND")
        att = self.c.attend(name, {l: q[l] for l in LAYERS}, doc_ids=[1, 9])
        for l in LAYERS:
            self.check_attend(q[l], now, [1, 9], att[l], l)

        # List: the v1 id set and versions, paged.
        page, nxt = self.c.list_docs(name, limit=5, snapshot_seq=S)
        self.assertEqual([d["id"] for d in page], [1, 2, 3, 4, 5])
        self.assertEqual(page_seq(self.c.list_docs(name, limit=5, snapshot_seq=S)), S)
        page2, nxt2 = self.c.list_docs(name, after_id=nxt, snapshot_seq=S)
        self.assertEqual([d["id"] for d in page2], [6, 7, 8])
        self.assertEqual(nxt2, 0)
        self.assertTrue(all(d["version"] == 1 for d in page + page2))
        cur_ids = [d["id"] for d in self.c.list_docs(name)[0]]
        self.assertEqual(cur_ids, sorted(now))

        # min_seq with snapshot_seq: at most snapshot_seq.
        self.c.route(name, rq, top_k=2, snapshot_seq=S, min_seq=S)
        with self.assertRaises(MsaError) as e:
            self.c.route(name, rq, top_k=2, snapshot_seq=S, min_seq=S + 1)
        self.assertEqual(e.exception.name, "INVALID_ARGUMENT")
        self.assertIn("min_seq", e.exception.details)

        c1 = self.counters()
        self.assertGreaterEqual(c1["engine.snapshots_held"], 1)
        self.assertEqual(c1["engine.snapshot_leases_granted"] - c0["engine.snapshot_leases_granted"], 1)

        # Release: later use is FAILED_PRECONDITION naming snapshot_seq.
        self.assertTrue(self.c.release_snapshot(S))
        self.assertFalse(self.c.release_snapshot(S))
        for call in (lambda: self.c.route(name, rq, snapshot_seq=S),
                     lambda: self.c.get(name, [1], snapshot_seq=S),
                     lambda: self.c.attend(name, {l: q[l] for l in LAYERS}, doc_ids=[1], snapshot_seq=S),
                     lambda: self.c.list_docs(name, snapshot_seq=S)):
            with self.assertRaises(MsaError) as e:
                call()
            self.assertEqual(e.exception.name, "FAILED_PRECONDITION")
            self.assertIn("snapshot_seq", e.exception.details)
            self.assertIn("not held", e.exception.details)
        c2 = self.counters()
        self.assertEqual(c2["engine.snapshot_leases_released"] - c1["engine.snapshot_leases_released"], 1)

    def test_get_and_list_hold(self):
        """Get and List start leases too; a Get's lease serves a later Route."""
        w = World(np.random.default_rng(12))
        name = self.collection(w, 4)
        v1 = {d: dict(w.docs[d]) for d in w.docs}
        g = self.c.get(name, [3], hold_snapshot_ms=10000)
        S = g.snapshot_seq
        self.c.delete(name, [1, 3])
        rq = {l: w.rand(2, HQ, D) for l in LAYERS}
        self.check_route(name, rq, v1, self.c.route(name, rq, top_k=4, snapshot_seq=S), 4)
        self.assertTrue(self.c.release_snapshot(S))
        page = self.c.list_docs(name, hold_snapshot_ms=10000)
        S2 = page.snapshot_seq
        self.assertGreater(S2, S)
        self.c.put(name, 7, w.new_doc(1), tokens=P)
        self.assertEqual([d["id"] for d in self.c.list_docs(name, snapshot_seq=S2)[0]], [2, 4])
        self.assertTrue(self.c.release_snapshot(S2))

    def test_drop_after_hold(self):
        """A snapshot held before DropCollection still sees the collection."""
        w = World(np.random.default_rng(17))
        name = self.collection(w, 3)
        rq = {l: w.rand(2, HQ, D) for l in LAYERS}
        S = self.c.route(name, rq, hold_snapshot_ms=10000).snapshot_seq
        self.c.drop_collection(name)
        self.c.create_collection(name, layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                                 chunk_tokens=P, kv_dtype="f32", routing_dtype="f32")
        self.check_route(name, rq, w.docs, self.c.route(name, rq, top_k=3, snapshot_seq=S), 3)
        g = self.c.get(name, 2, snapshot_seq=S)
        np.testing.assert_array_equal(g["layers"][LAYERS[1]]["v"], w.docs[2][LAYERS[1]][1])
        self.assertEqual(len(self.c.route(name, rq, top_k=3)[LAYERS[0]][0]), 0)   # the new one
        self.assertTrue(self.c.release_snapshot(S))

    def test_expiry_and_renewal(self):
        w = World(np.random.default_rng(13))
        name = self.collection(w, 3)
        rq = {l: w.rand(1, HQ, D) for l in LAYERS}
        c0 = self.counters()
        t0 = time.monotonic()
        S = self.c.route(name, rq, hold_snapshot_ms=1500).snapshot_seq
        self.c.put(name, 1, w.new_doc(1), tokens=P)   # S is no longer the newest
        time.sleep(0.4)
        self.c.route(name, rq, snapshot_seq=S, hold_snapshot_ms=3000)   # renew
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))             # past the first lease
        self.c.get(name, [2], snapshot_seq=S)                            # still held (renewed)
        # Abandon it: the reaper must close it without any further call on it.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            c = self.counters()
            if c["engine.snapshot_leases_expired"] > c0["engine.snapshot_leases_expired"]:
                break
            time.sleep(0.1)
        else:
            self.fail("the lease did not expire: %r" % c)
        elapsed = time.monotonic() - t0
        self.assertGreater(elapsed, 3.0)     # not before the renewed lease ran out
        self.assertEqual(c["engine.snapshot_leases_renewed"] - c0["engine.snapshot_leases_renewed"], 1)
        with self.assertRaises(MsaError) as e:
            self.c.route(name, rq, snapshot_seq=S)
        self.assertEqual(e.exception.name, "FAILED_PRECONDITION")
        self.assertIn("snapshot_seq", e.exception.details)
        self.assertIn("expired or released", e.exception.details)
        self.assertFalse(self.c.release_snapshot(S))

    def test_limits_and_bad_values(self):
        w = World(np.random.default_rng(14))
        name = self.collection(w, 2)
        rq = {l: w.rand(1, HQ, D) for l in LAYERS}
        with self.assertRaises(MsaError) as e:
            self.c.route(name, rq, hold_snapshot_ms=MAX_HOLD_MS + 1)
        self.assertEqual(e.exception.name, "INVALID_ARGUMENT")
        self.assertIn("hold_snapshot_ms", e.exception.details)
        with self.assertRaises(MsaError) as e:
            self.c.route(name, rq, snapshot_seq=10 ** 9)
        self.assertEqual(e.exception.name, "FAILED_PRECONDITION")
        self.assertIn("snapshot_seq", e.exception.details)
        with self.assertRaises(MsaError) as e:
            self.c.release_snapshot(0)
        self.assertEqual(e.exception.name, "INVALID_ARGUMENT")
        self.assertIn("snapshot_seq", e.exception.details)

        # Two leases on one seq share it: one release leaves it held.
        a = self.c.route(name, rq, hold_snapshot_ms=10000).snapshot_seq
        b = self.c.list_docs(name, hold_snapshot_ms=10000).snapshot_seq
        self.assertEqual(a, b)
        self.assertTrue(self.c.release_snapshot(a))
        self.c.route(name, rq, snapshot_seq=a)
        self.assertTrue(self.c.release_snapshot(a))
        with self.assertRaises(MsaError):
            self.c.route(name, rq, snapshot_seq=a)

        # At most MAX_HELD distinct snapshots.
        held = []
        try:
            for i in range(MAX_HELD - self.counters()["engine.snapshots_held"]):
                held.append(self.c.route(name, rq, hold_snapshot_ms=10000).snapshot_seq)
                self.c.put(name, 100 + i, w.new_doc(1), tokens=P)
            with self.assertRaises(MsaError) as e:
                self.c.route(name, rq, hold_snapshot_ms=10000)
            self.assertEqual(e.exception.name, "RESOURCE_EXHAUSTED")
            self.assertIn("--max-held-snapshots", e.exception.details)
            # Reading held ones (and a plain read) still works at the limit.
            self.c.route(name, rq, snapshot_seq=held[0], hold_snapshot_ms=5000)
            self.c.route(name, rq)
        finally:
            for s in held:
                self.assertTrue(self.c.release_snapshot(s))

    def test_concurrent_readers_of_one_snapshot(self):
        w = World(np.random.default_rng(15))
        name = self.collection(w, 10)
        v1 = {d: dict(w.docs[d]) for d in w.docs}
        T = 2
        rq = {l: w.rand(T, HQ, D) for l in LAYERS}
        q = {l: w.rand(T, HQ, D) for l in LAYERS}
        S = self.c.route(name, rq, top_k=5, hold_snapshot_ms=MAX_HOLD_MS).snapshot_seq
        want_route = {l: ref_route(rq[l], {d: v1[d][l][0] for d in v1}, 5) for l in LAYERS}
        want_att = {l: ref_attend(q[l], [v1[d][l][0] for d in (2, 5, 7)],
                                  [v1[d][l][1] for d in (2, 5, 7)]) for l in LAYERS}
        stop = threading.Event()
        errors = []

        def writer():
            wr = World(np.random.default_rng(99))
            c = Client(self.d.addr, timeout=30)
            i = 0
            try:
                while not stop.is_set():
                    did = 1 + i % 10
                    c.put(name, did, wr.new_doc(1 + i % 3), tokens=(1 + i % 3) * P)
                    c.put(name, 100 + i, wr.new_doc(1), tokens=P)
                    if i % 2:
                        c.delete(name, [100 + i - 1])
                    i += 1
            except Exception as e:  # noqa: BLE001
                errors.append("writer: %r" % e)
            finally:
                c.close()

        def reader(k):
            c = Client(self.d.addr, timeout=60)
            try:
                for it in range(12):
                    kind = (k + it) % 3
                    if kind == 0:
                        r = c.route(name, rq, top_k=5, snapshot_seq=S)
                        for l in LAYERS:
                            got = [int(x) for x in r[l][0]]
                            if got != [x[0] for x in want_route[l]] or not np.allclose(
                                    r[l][1], [x[1] for x in want_route[l]], atol=1e-5):
                                errors.append("route %d/%d: %r" % (k, it, got))
                    elif kind == 1:
                        a = c.attend(name, {l: q[l] for l in LAYERS}, doc_ids=[2, 5, 7], snapshot_seq=S)
                        for l in LAYERS:
                            if not (np.allclose(a[l].out, want_att[l][0], atol=1e-5)
                                    and np.allclose(a[l].lse, want_att[l][1], atol=1e-5)):
                                errors.append("attend %d/%d" % (k, it))
                    else:
                        recs = c.get(name, list(range(1, 11)), snapshot_seq=S)
                        for rec in recs:
                            d = rec["id"]
                            for l in LAYERS:
                                if not (np.array_equal(rec["layers"][l]["k"], v1[d][l][0]) and
                                        np.array_equal(rec["layers"][l]["v"], v1[d][l][1])):
                                    errors.append("get %d/%d id %d" % (k, it, d))
            except Exception as e:  # noqa: BLE001
                errors.append("reader %d: %r" % (k, e))
            finally:
                c.close()

        wt = threading.Thread(target=writer)
        wt.start()
        readers = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(120)
        stop.set()
        wt.join(60)
        self.assertEqual(errors, [])
        self.assertGreater(self.c.stats()["commit_seq"], S)
        self.assertTrue(self.c.release_snapshot(S))


def page_seq(page):
    return page.snapshot_seq


class MapGrowthTest(unittest.TestCase):
    """A small initial map: growing it must revoke leases, not wait for them."""

    def test_growth_revokes(self):
        d = Daemon(args=["--backend", "cpu", "--threads", "2", "--map-mb", "1",
                         "--map-max-mb", "256", "--max-snapshot-hold-ms", "60000"],
                   metrics=True).start()
        c = Client(d.addr, timeout=120)
        try:
            rng = np.random.default_rng(16)
            c.create_collection("g", layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=64,
                                chunk_tokens=P, kv_dtype="f32", routing_dtype="f32")
            small = {l: (rng.standard_normal((1, H, 64)).astype(np.float32),
                         rng.standard_normal((1, H, 64)).astype(np.float32)) for l in LAYERS}
            c.put("g", 1, small, tokens=P)
            rq = {l: rng.standard_normal((1, HQ, 64)).astype(np.float32) for l in LAYERS}
            S = c.route("g", rq, hold_snapshot_ms=60000).snapshot_seq
            c0 = c.stats()["counters"]
            # ~4 MiB of tensors: well past the 1 MiB map, so it must grow (twice or more).
            big = {l: (rng.standard_normal((256, H, 64)).astype(np.float32),
                       rng.standard_normal((256, H, 64)).astype(np.float32)) for l in LAYERS}
            t0 = time.monotonic()
            for did in range(2, 10):
                c.put("g", did, big, tokens=256 * P)
            took = time.monotonic() - t0
            # Without revocation the grow waits for the 60 s lease.
            self.assertLess(took, 30.0)
            c1 = c.stats()["counters"]
            self.assertGreaterEqual(c1["engine.snapshot_leases_revoked"] -
                                    c0["engine.snapshot_leases_revoked"], 1)
            self.assertEqual(c1["engine.snapshots_held"], 0)
            with self.assertRaises(MsaError) as e:
                c.route("g", rq, snapshot_seq=S)
            self.assertEqual(e.exception.name, "FAILED_PRECONDITION")
            self.assertIn("snapshot_seq", e.exception.details)
            self.assertIn("map growth", e.exception.details)
            # New leases work after the growth.
            S2 = c.route("g", rq, hold_snapshot_ms=5000).snapshot_seq
            self.assertEqual(len(c.route("g", rq, top_k=20, snapshot_seq=S2)[LAYERS[0]][0]), 9)
            self.assertTrue(c.release_snapshot(S2))
            # /metrics carries the families.
            with urllib.request.urlopen("http://%s/metrics" % d.metrics_addr, timeout=10) as r:
                text = r.read().decode()
            for fam in ("msad_snapshots_held 0", "msad_snapshot_leases_granted_total 2",
                        "msad_snapshot_leases_revoked_total", "msad_snapshot_leases_expired_total",
                        "msad_snapshot_leases_released_total 1",
                        "msad_snapshot_leases_renewed_total"):
                self.assertIn(fam, text)
        finally:
            c.close()
            rc = d.stop()
            with open(d.log_path, "rb") as f:
                log = f.read()
            d.cleanup()
        self.assertEqual(rc, 0)
        self.assertIn(b"revoked: map growth", log)


if __name__ == "__main__":
    unittest.main(verbosity=2)
