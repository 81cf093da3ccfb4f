"""Crash test: kill -9 msad at random moments while several clients write,
restart, and check that nothing acknowledged is lost and nothing is half
applied.

Each cycle: start msad on the same data dir (default durable sync), check the
store against the model, run W writer threads (grpcio stubs, one channel
each) that send inserts (expect_absent), replaces (with and without
expect_version), deletes, multi-op requests (several ids, two ops on one id)
and requests built to fail (a wrong expect_version or expect_absent as their
last op), then SIGKILL the daemon after a random delay. Every writer owns its
ids, sends one request at a time and logs every acknowledged request with its
commit_seq, its versions and the exact content written (tensors are made from
a seed, so they are regenerated for the comparison, byte for byte).

After each restart:
- the expected state is the previous verified state plus this cycle's
  acknowledged requests replayed in commit_seq order (commit_seqs unique);
- each writer has at most one unacknowledged request (in flight at the
  kill): the ids it touches must show exactly the state before it or exactly
  the state after it (all or nothing; every put of a request carries the
  request's generation tag in its metadata and text, and all its puts share
  one updated_seq); a request built to fail must never be visible;
- List gives exactly the expected ids with version, tokens, chunks,
  created_seq, updated_seq (acknowledged: the acknowledged commit_seq);
- Get with text, metadata and tensors matches byte for byte;
- the commit seq equals the seq before the cycle + acknowledged requests +
  unacknowledged requests found applied (no lost and no phantom commit);
- Verify reports no problem; Route over the rebuilt index matches an fp64
  reference on the expected documents.
At the end the daemon is stopped with SIGTERM and must exit 0.

Env: MSA_CRASH_CYCLES (default 30), MSA_CRASH_WRITERS (default 4),
MSA_CRASH_SEED (default: random, printed), MSA_BIN, MSA_SOURCE.
Prints cycles and acknowledged writes checked. Exits 77 when msad is not built.
"""
import os
import random
import signal
import sys
import tempfile
import threading
import time
import unittest
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import Daemon, from_tensor, msad_path, stubs, tensor  # noqa: E402

if not os.access(msad_path(), os.X_OK):
    print("skip: %s not built" % msad_path())
    sys.exit(77)

import grpc  # noqa: E402

pb, pb_grpc, hpb, hpb_grpc = stubs()
SC = grpc.StatusCode

CYCLES = int(os.environ.get("MSA_CRASH_CYCLES", "30"))
WRITERS = int(os.environ.get("MSA_CRASH_WRITERS", "4"))
SEED = int(os.environ.get("MSA_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))

COLL = "crash"
LAYERS = [2, 5]
H, HQ, D, P = 2, 4, 16, 4
IDS_PER_WRITER = 48          # a small id space: many replaces and deletes
ID_BASE = 1000000            # writer w owns ids w*ID_BASE+1 .. w*ID_BASE+IDS_PER_WRITER


def schema():
    return pb.CollectionSchema(layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D, chunk_tokens=P,
                               kv_dtype=pb.F32, routing_dtype=pb.F32, separate_router_keys=True)


# ---- content: everything a put writes follows from (seed, tokens, gen) ---------------

def tensors_of(seed, tokens):
    """{layer: (k, v, r)} float32 [C, H, D] arrays for a put."""
    rng = np.random.default_rng(seed)
    c = (tokens + P - 1) // P
    return {l: tuple(rng.standard_normal((c, H, D)).astype(np.float32) for _ in range(3)) for l in LAYERS}


def text_of(gen, doc_id, seed):
    return "%s id %d s%d ü€" % (gen, doc_id, seed) + "x" * (seed % 300)


def meta_of(gen, seed):
    return gen.encode() + b"\x00" + seed.to_bytes(8, "little") + bytes(range(seed % 40))


def doc_proto(doc_id, seed, tokens, gen):
    layers = [pb.LayerKV(layer=l, k=tensor(k), v=tensor(v), router_k=tensor(r))
              for l, (k, v, r) in tensors_of(seed, tokens).items()]
    return pb.Document(id=doc_id, text=text_of(gen, doc_id, seed), metadata=meta_of(gen, seed),
                       tokens=tokens, layers=layers)


class Rec:
    """Expected state of one present document."""
    __slots__ = ("version", "seed", "tokens", "gen", "created_seq", "updated_seq")

    def __init__(self, version, seed, tokens, gen, created_seq, updated_seq):
        self.version, self.seed, self.tokens, self.gen = version, seed, tokens, gen
        self.created_seq, self.updated_seq = created_seq, updated_seq

    def key(self):
        return (self.version, self.seed, self.tokens, self.gen, self.created_seq, self.updated_seq)


def apply_ops(state, ops, seq, gen):
    """Applies a request's ops (('put', id, seed, tokens) or ('del', id)) to
    state {id: Rec}; returns the versions (0 for deletes). seq None: unknown
    (an unacknowledged request), filled in from what the daemon shows."""
    versions = []
    for op in ops:
        if op[0] == "put":
            _, i, seed, tokens = op
            old = state.get(i)
            if old is None:
                state[i] = Rec(1, seed, tokens, gen, seq, seq)
            else:
                state[i] = Rec(old.version + 1, seed, tokens, gen, old.created_seq, seq)
            versions.append(state[i].version)
        else:
            del state[op[1]]
            versions.append(0)
    return versions


# ---- one writer thread ------------------------------------------------------------------

class Writer(threading.Thread):
    """Sends requests one at a time on its own ids until the daemon dies.

    acked: [(commit_seq, gen, ops, versions)]. inflight: (gen, ops, must_fail)
    of the request whose answer never came, or None."""

    def __init__(self, d, w, state, cycle, rng_seed):
        super().__init__(daemon=True)
        self.d, self.w, self.cycle = d, w, cycle
        self.state = {i: r for i, r in state.items() if i // ID_BASE == w}   # this writer's ids
        self.rng = random.Random(rng_seed)
        self.acked, self.inflight, self.errors = [], None, []
        self.n = 0
        self.failed_ok = 0

    def ids(self):
        return [self.w * ID_BASE + j for j in range(1, IDS_PER_WRITER + 1)]

    def seed(self):
        return self.rng.randrange(1, 1 << 62)

    def tokens(self):
        # mostly small; sometimes large enough for LMDB overflow pages
        return self.rng.choice([1, 2, 3, 5, 8, 13, 21]) if self.rng.random() < 0.8 else self.rng.randrange(40, 160)

    def plan(self):
        """(ops, WriteOp list, must_fail) for the next request."""
        st = {i: r.version for i, r in self.state.items()}   # a scratch view: version per present id
        present = [i for i in self.ids() if i in st]
        absent = [i for i in self.ids() if i not in st]
        ops, wops = [], []

        def put(i, expect=None):
            seed, tokens = self.seed(), self.tokens()
            ops.append(("put", i, seed, tokens))
            wop = pb.WriteOp(put=doc_proto(i, seed, tokens, self.gen))
            if expect == "absent":
                wop.expect_absent = True
            elif expect == "version":
                wop.expect_version = st[i]
            st[i] = st.get(i, 0) + 1
            wops.append(wop)

        def delete(i):
            ops.append(("del", i))
            wops.append(pb.WriteOp(delete_id=i))
            del st[i]

        r = self.rng.random()
        if r < 0.25 and absent:                       # insert
            put(self.rng.choice(absent), "absent")
        elif r < 0.45 and present:                    # replace
            put(self.rng.choice(present), self.rng.choice(["version", None]))
        elif r < 0.55 and len(present) > 1:           # delete + a put (every request shows a put)
            a, b = self.rng.sample(present, 2)
            delete(a)
            put(b, "version")
        else:                                         # multi-op
            k = self.rng.randrange(2, 6)
            for i in self.rng.sample(self.ids(), k):
                if i in st and self.rng.random() < 0.3 and len(st) > 1:
                    delete(i)
                    if self.rng.random() < 0.3:       # two ops on one id: re-insert it
                        put(i, "absent")
                elif i in st:
                    put(i, self.rng.choice(["version", None]))
                    if self.rng.random() < 0.2:       # replace twice in one request
                        put(i, "version")
                else:
                    put(i, "absent")
            if not any(o[0] == "put" for o in ops):
                put(self.rng.choice([i for i in self.ids() if i not in st] or list(st)),
                    "absent" if len(st) < IDS_PER_WRITER else "version")
        must_fail = False
        if self.rng.random() < 0.08:                  # a request that must write nothing
            must_fail = True
            cand = [i for i in self.ids() if i in st]
            if cand and self.rng.random() < 0.5:
                i = self.rng.choice(cand)
                wops.append(pb.WriteOp(put=doc_proto(i, 7, 1, self.gen), expect_version=st[i] + 5))
                self.want_code = SC.FAILED_PRECONDITION
            elif cand:
                i = self.rng.choice(cand)
                wops.append(pb.WriteOp(put=doc_proto(i, 7, 1, self.gen), expect_absent=True))
                self.want_code = SC.ALREADY_EXISTS
            else:
                must_fail = False
        return ops, wops, must_fail

    def run(self):
        try:
            mem = self.d.memory(self.d.channel())
            while True:
                self.n += 1
                self.gen = "g%d.%d.%d" % (self.cycle, self.w, self.n)
                ops, wops, must_fail = self.plan()
                self.inflight = (self.gen, ops, must_fail)
                try:
                    resp = mem.Write(pb.WriteRequest(collection=COLL, ops=wops), timeout=30)
                except grpc.RpcError as e:
                    if must_fail and e.code() == self.want_code:
                        self.inflight = None
                        self.failed_ok += 1
                        continue
                    if e.code() not in (SC.UNAVAILABLE, SC.CANCELLED, SC.INTERNAL) or \
                            (e.code() == SC.INTERNAL and "RST_STREAM" not in (e.details() or "")):
                        self.errors.append("%s: %s %s" % (self.gen, e.code(), e.details()))
                    return          # the daemon is gone: this request stays in flight
                self.inflight = None
                if must_fail:
                    self.errors.append("%s: a request built to fail was acknowledged" % self.gen)
                    return
                versions = apply_ops(self.state, ops, resp.commit_seq, self.gen)
                if list(resp.versions) != versions:
                    self.errors.append("%s: versions %s, want %s" % (self.gen, list(resp.versions), versions))
                    return
                self.acked.append((resp.commit_seq, self.gen, ops, versions))
        except Exception as e:   # noqa: BLE001 - reported by the test
            self.errors.append("writer %d: %r" % (self.w, e))


# ---- checks ---------------------------------------------------------------------------

def ref_route(q, state, layer, top_k):
    """COSINE / HEAD_MEAN / QUERY_MAX / CHUNK_MAX on the router keys, fp64."""
    q = q.astype(np.float64)
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    g = HQ // H
    out = []
    for did, r in state.items():
        k = tensors_of(r.seed, r.tokens)[layer][2].astype(np.float64)
        kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
        s = np.einsum("tjd,rjd->tjr", qn, np.repeat(kn, g, axis=1)).mean(axis=1).max(axis=0)
        out.append((did, float(s.max())))
    out.sort(key=lambda x: (-x[1], x[0]))
    return out[:top_k]


class CrashTest(unittest.TestCase):
    def list_all(self, mem):
        infos, after = {}, 0
        while True:
            page = mem.List(pb.ListRequest(collection=COLL, after_id=after, limit=1000), timeout=30)
            for x in page.documents:
                infos[x.id] = x
            if not page.next_after_id:
                return infos
            after = page.next_after_id

    def resolve(self, mem, base, writers, seq_before):
        """Checks the restarted store against base + acknowledged requests +
        all-or-nothing in-flight ones; returns (new state, writes checked)."""
        infos = self.list_all(mem)
        acked = sorted((a for w in writers for a in w.acked), key=lambda a: a[0])
        seqs = [a[0] for a in acked]
        self.assertEqual(len(seqs), len(set(seqs)), "duplicate commit_seq among acknowledged writes")
        if seqs:
            self.assertGreater(seqs[0], seq_before)
        expect = dict(base)
        for seq, gen, ops, versions in acked:
            self.assertEqual(apply_ops(expect, ops, seq, gen), versions)
        applied_unacked = 0
        for w in writers:
            if not w.inflight:
                continue
            gen, ops, must_fail = w.inflight
            touched = {op[1] for op in ops}
            after = {i: expect[i] for i in touched if i in expect}
            apply_ops(after, ops, None, gen)
            seen = {i for i in touched if i in infos}
            before_ok = seen == {i for i in touched if i in expect} and all(
                infos[i].version == expect[i].version and infos[i].updated_seq == expect[i].updated_seq
                for i in seen)
            after_ok = (not must_fail) and seen == set(after) and all(
                infos[i].version == after[i].version and
                (after[i].updated_seq is not None or infos[i].updated_seq > seq_before)
                for i in seen)
            self.assertTrue(before_ok or after_ok,
                            "request %s half applied or wrong after the crash: ops %s; seen %s" %
                            (gen, ops, {i: (infos[i].version, infos[i].updated_seq) for i in seen}))
            if after_ok and not before_ok:
                applied_unacked += 1
                useqs = {infos[i].updated_seq for i in seen if after[i].updated_seq is None}
                self.assertEqual(len(useqs), 1, "%s: puts of one request with different updated_seq %s" %
                                 (gen, useqs))
                s = useqs.pop()
                for i in touched:
                    expect.pop(i, None)
                for i, r in after.items():
                    if r.updated_seq is None:
                        r.updated_seq = s
                    if r.created_seq is None:
                        r.created_seq = s
                    expect[i] = r
        # Ids, versions and seqs.
        self.assertEqual(sorted(infos), sorted(expect), "document ids after restart")
        for i, r in expect.items():
            x = infos[i]
            self.assertEqual((x.version, x.tokens, x.chunks, x.created_seq, x.updated_seq),
                             (r.version, r.tokens, (r.tokens + P - 1) // P, r.created_seq, r.updated_seq),
                             "document %d (gen %s)" % (i, r.gen))
        # Content, byte for byte.
        ids = sorted(expect)
        for k in range(0, len(ids), 64):
            batch = ids[k:k + 64]
            g = mem.Get(pb.GetRequest(collection=COLL, ids=batch, with_text=True, with_metadata=True,
                                      with_tensors=True), timeout=30)
            self.assertEqual([x.info.id for x in g.records], batch)
            for rec in g.records:
                r = expect[rec.info.id]
                self.assertEqual(rec.document.text, text_of(r.gen, rec.info.id, r.seed))
                self.assertEqual(rec.document.metadata, meta_of(r.gen, r.seed))
                want = tensors_of(r.seed, r.tokens)
                self.assertEqual(sorted(l.layer for l in rec.document.layers), LAYERS)
                for l in rec.document.layers:
                    k_, v_, r_ = want[l.layer]
                    for t, a in ((l.k, k_), (l.v, v_), (l.router_k, r_)):
                        self.assertEqual(t.dtype, pb.F32)
                        self.assertEqual(list(t.shape), list(a.shape))
                        self.assertEqual(t.data, a.tobytes(), "tensor bytes of %d" % rec.info.id)
        stats = mem.Stats(pb.StatsRequest(), timeout=30)
        self.assertEqual(stats.commit_seq, seq_before + len(acked) + applied_unacked,
                         "commit seq: lost or phantom commits")
        return expect, len(acked), sum(len(a[2]) for a in acked), applied_unacked

    def check_route(self, mem, state, rng):
        q = rng.standard_normal((3, HQ, D)).astype(np.float32)
        top_k = 8
        r = mem.Route(pb.RouteRequest(collection=COLL, top_k=top_k,
                                      layers=[pb.LayerQuery(layer=l, routing_q=tensor(q)) for l in LAYERS]),
                      timeout=30)
        for lr in r.layers:
            want = ref_route(q, state, lr.layer, top_k)
            self.assertEqual(list(lr.doc_ids), [x[0] for x in want], "route layer %d" % lr.layer)
            np.testing.assert_allclose(list(lr.scores), [x[1] for x in want], rtol=1e-4, atol=1e-5)

    def test_kill9_cycles(self):
        rnd = random.Random(SEED)
        nprng = np.random.default_rng(SEED)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="msa-crash-") as tmp:
            d = Daemon(tmp=tmp, args=["--threads", "2"])
            try:
                d.start()
                mem = d.memory()
                mem.CreateCollection(pb.CreateCollectionRequest(name=COLL, schema=schema()))
                state = {}
                tot_req = tot_ops = tot_unacked = tot_failed = tot_docs = 0
                for cycle in range(CYCLES):
                    seq_before = mem.Stats(pb.StatsRequest(), timeout=30).commit_seq
                    writers = [Writer(d, w, state, cycle, rnd.randrange(1 << 40)) for w in range(WRITERS)]
                    for w in writers:
                        w.start()
                    delay = rnd.choice([rnd.uniform(0.0, 0.15), rnd.uniform(0.15, 1.2)])
                    time.sleep(delay)
                    os.kill(d.proc.pid, signal.SIGKILL)
                    d.proc.wait()
                    for w in writers:
                        w.join(60)
                        self.assertFalse(w.is_alive(), "writer hangs after the kill")
                    d.kill()      # reaps, closes channels
                    errs = [e for w in writers for e in w.errors]
                    self.assertEqual(errs, [], "cycle %d (seed %d)" % (cycle, SEED))
                    d.start()
                    mem = d.memory()
                    d.wait_healthy()
                    try:
                        state, nreq, nops, nun = self.resolve(mem, state, writers, seq_before)
                        v = d.admin().Verify(pb.VerifyRequest(), timeout=60)
                        self.assertEqual(list(v.problems), [])
                        self.assertEqual(v.documents_checked, len(state))
                        self.check_route(mem, state, nprng)
                    except AssertionError as e:
                        raise AssertionError("cycle %d (seed %d, kill after %.3f s): %s" %
                                             (cycle, SEED, delay, e)) from None
                    tot_req += nreq
                    tot_ops += nops
                    tot_unacked += nun
                    tot_failed += sum(w.failed_ok for w in writers)
                    tot_docs += len(state)
                    if os.environ.get("MSA_TEST_VERBOSE"):
                        print("cycle %d: kill after %.3f s, %d acked requests, %d in flight applied, %d docs" %
                              (cycle, delay, nreq, nun, len(state)))
                self.assertGreater(tot_req, CYCLES, "too few acknowledged writes to mean anything")
                self.assertEqual(d.stop(), 0, d.log_tail())
            finally:
                d.cleanup()
        print("crash test: %d kill -9 cycles, %d acknowledged write requests (%d ops) checked, "
              "%d unacknowledged requests found applied (all ops), %d expected-to-fail requests "
              "refused, %d documents compared byte for byte, %.1f s (seed %d)" %
              (CYCLES, tot_req, tot_ops, tot_unacked, tot_failed, tot_docs, time.monotonic() - t0, SEED))


if __name__ == "__main__":
    unittest.main(verbosity=2)
