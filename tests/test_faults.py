"""Fault injection against a real msad (grpcio stubs, raw sockets).

- Store full (a small LMDB map, --map-max-mb 4): writes get RESOURCE_EXHAUSTED
  "store full"; Route, Attend, Get, List, Stats, Describe keep answering;
  a refused write leaves nothing (commit seq, ids unchanged); after deleting
  documents, writes work again (LMDB reuses freed pages; the engine makes
  one empty commit so the pages freed by the delete are reusable at once);
  a store filled to the brim with small documents can still delete (deletes
  may use the map's reserve, see storage/store.h msa_store_reserve) and then
  accept writes again; every acknowledged document survives a restart byte
  for byte and Verify is clean.
- Disk full: the same on a 3 MiB tmpfs (needs root to mount; skipped
  otherwise).
- LMDB reader slots exhausted (--max-readers 2, many concurrent large Gets):
  RESOURCE_EXHAUSTED naming the reader slots, the other calls answer right,
  the daemon serves afterwards.
- A client that disconnects mid-call (raw HTTP/2: half a Write message, then
  close; and a grpc future of a large Write cancelled): no partial write,
  commit seq unchanged, daemon healthy.
- Slow clients (raw HTTP/2 connections that send half a request or half the
  preface and stall, more of them than handler threads): other clients are
  still served.
- Corrupt data file at start (garbage, garbage of a few bytes, truncated to
  half, to 3 pages, to 0 bytes, both meta pages damaged): msad exits 1 with a
  message naming data.mdb; no signal exit, no serving, file untouched.
- Damaged pages inside a valid file (per-value CRC-32C + the integrity walk
  that msad runs in a child process at start, --check-on-start):
  a page of a tensor block overwritten -> refused at start naming the block;
  with --check-on-start off, Get/Attend of that document fail with DATA_LOSS
  naming collection, document, layer and kind (other documents still served),
  and a damaged K block (which the index rebuild reads) is refused at open;
  every branch/leaf page of a compacted copy overwritten -> refused, exit 1,
  no signal exit.
  MSA_FAULT_PAGE_SCAN=1 overwrites every page in turn, of the store as
  written (with free pages) and of its compacted copy (none): each one is
  refused at start, or harmless, meaning msad serves, Verify is clean and
  every document (text, metadata, K, V) reads back byte for byte and Route/
  Attend answer; only free pages may be harmless, so the compacted copy must
  refuse them all. 0 crashes, 0 silent cases.

Run: ~/.cache/msad/venv/bin/python tests/test_faults.py (MSA_BIN, MSA_SOURCE as in
daemon_util.py). Exits 77 when msad has not been built.
"""
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import Daemon, msad_path, stubs, tensor, GrpcCase  # noqa: E402

if not os.access(msad_path(), os.X_OK):
    print("skip: %s not built" % msad_path())
    sys.exit(77)

import grpc  # noqa: E402

pb, pb_grpc, hpb, hpb_grpc = stubs()
SC = grpc.StatusCode

H, HQ, D, P = 2, 4, 16, 4
LAYER = 0


def schema():
    return pb.CollectionSchema(layers=[LAYER], kv_heads=H, query_heads=HQ, head_dim=D, chunk_tokens=P,
                               kv_dtype=pb.F32, routing_dtype=pb.F32)


def kv_of(seed, tokens):
    rng = np.random.default_rng(seed)
    c = (tokens + P - 1) // P
    return (rng.standard_normal((c, H, D)).astype(np.float32),
            rng.standard_normal((c, H, D)).astype(np.float32))


def doc(i, tokens, seed=None):
    seed = i if seed is None else seed
    k, v = kv_of(seed, tokens)
    return pb.Document(id=i, text="doc %d seed %d" % (i, seed), metadata=b"m%d" % seed, tokens=tokens,
                       layers=[pb.LayerKV(layer=LAYER, k=tensor(k), v=tensor(v))])


def put(i, tokens, seed=None):
    return pb.WriteOp(put=doc(i, tokens, seed))


STORE_FULL = ("store full",)


class FaultCase(GrpcCase):
    def list_ids(self, m, coll):
        ids, after = [], 0
        while True:
            page = m.List(pb.ListRequest(collection=coll, after_id=after, limit=1000), timeout=30)
            ids += [x.id for x in page.documents]
            if not page.next_after_id:
                return ids
            after = page.next_after_id

    def check_docs(self, m, coll, acked):
        """acked {id: (tokens, seed)}: exactly these, byte for byte."""
        self.assertEqual(self.list_ids(m, coll), sorted(acked))
        ids = sorted(acked)
        for k in range(0, len(ids), 50):
            batch = ids[k:k + 50]
            g = m.Get(pb.GetRequest(collection=coll, ids=batch, with_text=True, with_metadata=True,
                                    with_tensors=True), timeout=60)
            for rec in g.records:
                tokens, seed = acked[rec.info.id]
                want_k, want_v = kv_of(seed, tokens)
                self.assertEqual(rec.document.text, "doc %d seed %d" % (rec.info.id, seed))
                self.assertEqual(rec.document.metadata, b"m%d" % seed)
                (l,) = rec.document.layers
                self.assertEqual(l.k.data, want_k.tobytes(), "k of %d" % rec.info.id)
                self.assertEqual(l.v.data, want_v.tobytes(), "v of %d" % rec.info.id)

    def reads_work(self, m, coll, acked):
        q = tensor(np.random.default_rng(1).standard_normal((2, HQ, D)).astype(np.float32))
        r = m.Route(pb.RouteRequest(collection=coll, top_k=5, layers=[pb.LayerQuery(layer=LAYER, routing_q=q)]),
                    timeout=30)
        self.assertEqual(len(r.layers[0].doc_ids), min(5, len(acked)))
        self.assertTrue(set(r.layers[0].doc_ids) <= set(acked))
        a = m.Attend(pb.AttendRequest(collection=coll, top_k=3,
                                      layers=[pb.LayerQuery(layer=LAYER, routing_q=q, q=q)]), timeout=30)
        self.assertEqual(len(a.layers[0].doc_ids), min(3, len(acked)))
        self.assertEqual(m.DescribeCollection(pb.DescribeCollectionRequest(name=coll), timeout=30).documents,
                         len(acked))
        self.assertEqual(m.Stats(pb.StatsRequest(), timeout=30).documents, len(acked))
        self.check_docs(m, coll, acked)


# ==== store full ==============================================================================

class TestStoreFull(FaultCase):
    """--map-max-mb 4: the map's soft limit is 3 MiB (1 MiB reserve for deletes)."""

    BIG = 2000   # tokens: K and V of 64000 bytes each (LMDB overflow pages), ~128 KiB a document

    def fill(self, m, coll, acked, first_id, tokens, per_req, limit=100000):
        """Writes until RESOURCE_EXHAUSTED; returns the number of requests acknowledged."""
        i, n = first_id, 0
        while n < limit:
            ops = [put(i + j, tokens) for j in range(per_req)]
            try:
                m.Write(pb.WriteRequest(collection=coll, ops=ops), timeout=60)
            except grpc.RpcError as e:
                self.assertEqual(e.code(), SC.RESOURCE_EXHAUSTED, e.details())
                for c in STORE_FULL:
                    self.assertIn(c, e.details())
                return n, i
            for j in range(per_req):
                acked[i + j] = (tokens, i + j)
            i += per_req
            n += 1
        self.fail("the store never filled up")

    def test_map_full_then_free(self):
        with tempfile.TemporaryDirectory(prefix="msa-full-") as tmp:
            args = ["--map-max-mb", "4"]
            d = Daemon(tmp=tmp, args=args)
            d.start()
            try:
                m = d.memory()
                m.CreateCollection(pb.CreateCollectionRequest(name="big", schema=schema()))
                acked = {}
                n1, nxt = self.fill(m, "big", acked, 1, self.BIG, 1)
                self.assertGreater(n1, 10)              # the limit, not something else, stopped it
                store_bytes = m.Stats(pb.StatsRequest()).store_bytes
                self.assertLessEqual(store_bytes, 4 << 20)
                # A refused write leaves nothing; reads work.
                seq = m.Stats(pb.StatsRequest()).commit_seq
                self.assertCode(SC.RESOURCE_EXHAUSTED, m.Write,
                                pb.WriteRequest(collection="big", ops=[put(nxt, self.BIG)]), contains=STORE_FULL)
                self.assertEqual(m.Stats(pb.StatsRequest()).commit_seq, seq)
                self.reads_work(m, "big", acked)
                # Delete two documents; the next write of the same size succeeds at once.
                m.Write(pb.WriteRequest(collection="big", ops=[pb.WriteOp(delete_id=1), pb.WriteOp(delete_id=2)]))
                del acked[1], acked[2]
                m.Write(pb.WriteRequest(collection="big", ops=[put(nxt, self.BIG)]))
                acked[nxt] = (self.BIG, nxt)
                n2, nxt = self.fill(m, "big", acked, nxt + 1, self.BIG, 1)
                self.assertLessEqual(n2, 2)
                # Fill to the brim with small documents (no room for even one
                # more small request), then deletes must still go through.
                n3, nxt = self.fill(m, "big", acked, nxt, 40, 8)
                self.assertGreater(n3, 0)
                n4, nxt = self.fill(m, "big", acked, nxt, 8, 1)     # ends refused
                small = sorted(i for i, (t, _) in acked.items() if t != self.BIG)
                m.Write(pb.WriteRequest(collection="big", ops=[pb.WriteOp(delete_id=small[0])]))
                del acked[small[0]]
                # Free about half of the small documents and two big ones.
                victims = small[1::2] + [i for i, (t, _) in sorted(acked.items()) if t == self.BIG][:2]
                for k in range(0, len(victims), 20):
                    m.Write(pb.WriteRequest(collection="big",
                                            ops=[pb.WriteOp(delete_id=i) for i in victims[k:k + 20]]))
                    for i in victims[k:k + 20]:
                        del acked[i]
                # Writes work again, small and big.
                for j in range(5):
                    m.Write(pb.WriteRequest(collection="big", ops=[put(nxt + j, 40)]))
                    acked[nxt + j] = (40, nxt + j)
                m.Write(pb.WriteRequest(collection="big", ops=[put(nxt + 5, self.BIG)]))
                acked[nxt + 5] = (self.BIG, nxt + 5)
                self.reads_work(m, "big", acked)
                self.assertEqual(list(d.admin().Verify(pb.VerifyRequest()).problems), [])
                self.assertEqual(d.stop(), 0, d.log_tail())
                # Restart: everything acknowledged is there, byte for byte.
                d.start()
                m = d.memory()
                self.check_docs(m, "big", acked)
                self.assertEqual(list(d.admin().Verify(pb.VerifyRequest()).problems), [])
                m.Write(pb.WriteRequest(collection="big", ops=[pb.WriteOp(delete_id=nxt + 5)]))
                self.assertEqual(d.stop(), 0, d.log_tail())
                print("store full: %d big docs filled the 4 MiB map (file %d bytes); %d small requests "
                      "to the brim; deletes and writes again OK" % (n1, store_bytes, n3 + n4))
            finally:
                d.cleanup()

    def test_full_concurrent_delete_not_refused(self):
        """A delete grouped with puts that do not fit must not fail with them."""
        with Daemon(args=["--map-max-mb", "4"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="c", schema=schema()))
            acked = {}
            _, nxt = self.fill(m, "c", acked, 1, self.BIG, 1)
            results = {}

            def call(key, req):
                try:
                    results[key] = m.Write(req, timeout=60)
                except grpc.RpcError as e:
                    results[key] = e

            for rnd in range(3):
                victim = sorted(acked)[0]
                reqs = {("put", rnd, j): pb.WriteRequest(collection="c", ops=[put(nxt + j, 3 * self.BIG)])
                        for j in range(4)}
                reqs[("del", rnd)] = pb.WriteRequest(collection="c", ops=[pb.WriteOp(delete_id=victim)])
                ts = [threading.Thread(target=call, args=kv) for kv in reqs.items()]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(60)
                r = results[("del", rnd)]
                self.assertNotIsInstance(r, grpc.RpcError, getattr(r, "details", lambda: "")())
                del acked[victim]
                for j in range(4):
                    r = results[("put", rnd, j)]
                    if isinstance(r, grpc.RpcError):
                        self.assertEqual(r.code(), SC.RESOURCE_EXHAUSTED)
                    else:
                        acked[nxt + j] = (3 * self.BIG, nxt + j)
                nxt += 4
            self.check_docs(m, "c", acked)


class TestDiskFull(FaultCase):
    def test_tmpfs_full(self):
        if os.geteuid() != 0 or not shutil.which("mount"):
            self.skipTest("needs root to mount a small tmpfs")
        with tempfile.TemporaryDirectory(prefix="msa-disk-") as tmp:
            mnt = os.path.join(tmp, "mnt")
            os.mkdir(mnt)
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], capture_output=True)
            if r.returncode != 0:
                self.skipTest("cannot mount tmpfs: %s" % r.stderr.decode().strip())
            d = Daemon(tmp=tmp, data_dir=os.path.join(mnt, "data"))
            try:
                d.start()
                m = d.memory()
                m.CreateCollection(pb.CreateCollectionRequest(name="c", schema=schema()))
                acked = {}
                n, nxt = TestStoreFull.fill(self, m, "c", acked, 1, TestStoreFull.BIG, 1)
                self.assertGreater(n, 5)
                self.reads_work(m, "c", acked)
                self.assertCode(SC.RESOURCE_EXHAUSTED, m.Write,
                                pb.WriteRequest(collection="c", ops=[put(nxt, TestStoreFull.BIG)]),
                                contains=STORE_FULL)
                m.Write(pb.WriteRequest(collection="c", ops=[pb.WriteOp(delete_id=1), pb.WriteOp(delete_id=2)]))
                del acked[1], acked[2]
                m.Write(pb.WriteRequest(collection="c", ops=[put(nxt, TestStoreFull.BIG)]))
                acked[nxt] = (TestStoreFull.BIG, nxt)
                self.assertEqual(list(d.admin().Verify(pb.VerifyRequest()).problems), [])
                self.assertEqual(d.stop(), 0, d.log_tail())
                d.start()
                self.check_docs(d.memory(), "c", acked)
                self.assertEqual(d.stop(), 0, d.log_tail())
                print("disk full: %d docs filled a 3 MiB tmpfs; RESOURCE_EXHAUSTED, then writes again" % n)
            finally:
                d.kill()
                subprocess.run(["umount", mnt], capture_output=True)


# ==== reader slots ============================================================================

class TestReaderSlots(FaultCase):
    def test_readers_exhausted(self):
        with Daemon(args=["--max-readers", "2", "--handlers", "16"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="r", schema=schema()))
            acked = {}
            for i in range(1, 9):       # 8 docs x 2 MiB of tensors
                m.Write(pb.WriteRequest(collection="r", ops=[put(i, 16000)]))
                acked[i] = (16000, i)
            want = {i: kv_of(i, 16000) for i in acked}
            codes, bad = {"ok": 0, "full": 0}, []
            lock = threading.Lock()
            deadline = time.monotonic() + 30

            def reader(w):
                mm = d.memory(d.channel())
                while time.monotonic() < deadline:
                    with lock:
                        if codes["full"] >= 3 and codes["ok"] >= 20:
                            return
                    ids = [1 + (w + j) % 8 for j in range(4)]
                    try:
                        g = mm.Get(pb.GetRequest(collection="r", ids=ids, with_tensors=True), timeout=60)
                        for rec in g.records:
                            if rec.document.layers[0].k.data != want[rec.info.id][0].tobytes():
                                bad.append("wrong bytes for %d" % rec.info.id)
                        with lock:
                            codes["ok"] += 1
                    except grpc.RpcError as e:
                        if e.code() == SC.RESOURCE_EXHAUSTED and "reader" in e.details():
                            with lock:
                                codes["full"] += 1
                        else:
                            bad.append("%s %s" % (e.code(), e.details()))

            ts = [threading.Thread(target=reader, args=(w,)) for w in range(12)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(90)
            self.assertEqual(bad, [])
            self.assertGreaterEqual(codes["full"], 1, "never saw reader slots exhausted: %s" % codes)
            self.assertGreater(codes["ok"], 0)
            # The service recovers: reads and writes work, the store is sound.
            self.reads_work(m, "r", acked)
            m.Write(pb.WriteRequest(collection="r", ops=[pb.WriteOp(delete_id=8)]))
            self.assertEqual(list(d.admin().Verify(pb.VerifyRequest()).problems), [])
            print("reader slots: %d calls answered, %d RESOURCE_EXHAUSTED" % (codes["ok"], codes["full"]))


# ==== raw HTTP/2 clients: disconnect mid-call, slow clients =================================

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ftype, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name, value):
    """Literal header field without indexing, new name (RFC 7541 6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def grpc_headers(path, authority):
    block = b"".join(hpack_literal(n, v) for n, v in [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", authority),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    return frame(1, 0x4, 1, block)          # HEADERS, END_HEADERS, stream 1


def half_call(addr, path, message, fraction=0.5):
    """A socket that sent a gRPC call's headers and part of its message."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    body = b"\x00" + struct.pack(">I", len(message)) + message
    cut = body[:max(6, int(len(body) * fraction))][:60000]   # within the initial flow-control window
    s.sendall(PREFACE + frame(4, 0, 0, b"") + grpc_headers(path, addr.encode()) + frame(0, 0, 1, cut))
    return s


class TestClients(FaultCase):
    def test_disconnect_mid_call(self):
        with Daemon() as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="dc", schema=schema()))
            m.Write(pb.WriteRequest(collection="dc", ops=[put(1, 8)]))
            acked = {1: (8, 1)}
            seq = m.Stats(pb.StatsRequest()).commit_seq
            msg = pb.WriteRequest(collection="dc", ops=[put(777, 400), put(778, 400)]).SerializeToString()
            for frac in (0.05, 0.5, 0.95):
                s = half_call(d.addr, b"/msa.v1.Memory/Write", msg, frac)
                time.sleep(0.2)
                s.close()                       # gone mid-message
            # A TCP reset instead of a FIN.
            s = half_call(d.addr, b"/msa.v1.Memory/Write", msg, 0.5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            time.sleep(0.3)
            self.assertEqual(m.Stats(pb.StatsRequest()).commit_seq, seq)
            self.assertEqual(self.list_ids(m, "dc"), [1])
            # A large write cancelled by the client while it is being sent.
            big = pb.WriteRequest(collection="dc", ops=[put(900 + j, 60000, seed=900 + j) for j in range(4)])
            outcomes = []
            for delay in (0.0, 0.01, 0.05):
                f = m.Write.future(big, timeout=60)
                time.sleep(delay)
                f.cancel()
                try:
                    f.result()
                    outcomes.append("ok")
                except grpc.FutureCancelledError:
                    outcomes.append("cancelled")
                except grpc.RpcError as e:
                    outcomes.append(str(e.code()))
            time.sleep(0.3)
            ids = set(self.list_ids(m, "dc")) - {1}
            # All or nothing per request (the same request was sent three times).
            self.assertIn(ids, (set(), {900, 901, 902, 903}))
            for i in ids:
                acked[i] = (60000, i)
            self.check_docs(m, "dc", acked)
            self.assertEqual(d.health().Check(hpb.HealthCheckRequest(), timeout=5).status,
                             hpb.HealthCheckResponse.SERVING)
            m.Write(pb.WriteRequest(collection="dc", ops=[put(2, 8)]))
            self.assertEqual(list(d.admin().Verify(pb.VerifyRequest()).problems), [])
            print("disconnects: raw half-sent writes left nothing; cancelled large writes: %s" % outcomes)

    def test_slow_clients(self):
        with Daemon(args=["--handlers", "2", "--max-queue", "4"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="slow", schema=schema()))
            msg = pb.WriteRequest(collection="slow", ops=[put(500, 400)]).SerializeToString()
            q = tensor(np.ones((1, HQ, D), np.float32))
            rmsg = pb.RouteRequest(collection="slow", layers=[pb.LayerQuery(layer=LAYER, routing_q=q)]).SerializeToString()
            host, port = d.addr.rsplit(":", 1)
            stalled = [half_call(d.addr, b"/msa.v1.Memory/Write", msg, 0.5) for _ in range(6)]
            stalled += [half_call(d.addr, b"/msa.v1.Memory/Route", rmsg, 0.5) for _ in range(4)]
            for _ in range(3):                      # half the preface, or nothing at all
                s = socket.create_connection((host, int(port)), timeout=10)
                s.sendall(PREFACE[:10])
                stalled.append(s)
            stalled.append(socket.create_connection((host, int(port)), timeout=10))
            time.sleep(0.5)
            t0 = time.monotonic()
            acked = {}
            for i in range(1, 21):
                m.Write(pb.WriteRequest(collection="slow", ops=[put(i, 8)]), timeout=5)
                acked[i] = (8, i)
                m.Route(pb.RouteRequest(collection="slow", layers=[pb.LayerQuery(layer=LAYER, routing_q=q)]),
                        timeout=5)
            self.reads_work(m, "slow", acked)
            elapsed = time.monotonic() - t0
            self.assertLess(elapsed, 20)
            self.assertEqual(d.health().Check(hpb.HealthCheckRequest(), timeout=5).status,
                             hpb.HealthCheckResponse.SERVING)
            for s in stalled:
                s.close()
            time.sleep(0.2)
            self.check_docs(m, "slow", acked)       # nothing from the stalled writes
            print("slow clients: %d stalled connections, 20 writes + routes served in %.2f s" %
                  (len(stalled), elapsed))


# ==== corrupt data file at start =============================================================

def overwrite(path, data):
    with open(path, "wb") as f:
        f.write(data)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class TestCorruptFile(FaultCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="msa-corrupt-")
        backups = os.path.join(cls.tmp, "backups")
        os.mkdir(backups)
        d = Daemon(tmp=cls.tmp, args=["--backup-dir", backups])
        d.start()
        m = d.memory()
        m.CreateCollection(pb.CreateCollectionRequest(name="c", schema=schema()))
        cls.acked = {}
        for i in range(1, 120):
            tokens = 8 if i % 3 else 300        # 300 tokens: K and V of 9600 bytes (overflow pages)
            m.Write(pb.WriteRequest(collection="c", ops=[put(i, tokens)]))
            cls.acked[i] = (tokens, i)
        d.admin().Backup(pb.BackupRequest(name="compact", compact=True))
        assert d.stop() == 0
        cls.src = d.data_dir
        cls.compact = os.path.join(backups, "compact")
        cls.size = os.path.getsize(os.path.join(cls.src, "data.mdb"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def start_corrupt(self, name, mutate, allow_serve=False, src=None, args=()):
        """Copies the store, damages data.mdb, starts msad. Returns (rc or None
        when it served, stderr)."""
        dst = os.path.join(self.tmp, name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src or self.src, dst)
        path = os.path.join(dst, "data.mdb")
        mutate(path)
        before = sha(path)
        proc = subprocess.Popen([msad_path(), "--data", dst, "--listen", "127.0.0.1:0"] + list(args),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=30)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = None
        self.assertEqual(sha(path), before, "%s: msad modified the damaged file" % name)
        if rc is not None:
            self.assertGreaterEqual(rc, 0, "%s: msad died of signal %d:\n%s" % (name, -rc, err[-2000:]))
        if not allow_serve:
            self.assertIsNotNone(rc, "%s: msad served a damaged store" % name)
            self.assertNotIn("listening on", out, name)
            self.assertEqual(rc, 1, "%s: %s" % (name, err))
            self.assertIn(path, err, "%s: the message must name the file" % name)
        shutil.rmtree(dst, ignore_errors=True)
        return rc, err

    def test_garbage(self):
        _, err = self.start_corrupt("garbage", lambda p: overwrite(p, os.urandom(self.size)))
        self.assertIn("not an LMDB store or damaged", err)
        self.start_corrupt("garbage_small", lambda p: overwrite(p, os.urandom(100)))

    def test_truncated(self):
        _, err = self.start_corrupt("half", lambda p: os.truncate(p, self.size // 2))
        self.assertIn("truncated", err)
        _, err = self.start_corrupt("three_pages", lambda p: os.truncate(p, 3 * 4096))
        self.assertIn("truncated", err)
        _, err = self.start_corrupt("empty", lambda p: os.truncate(p, 0))
        self.assertIn("empty file", err)

    def test_meta_pages_damaged(self):
        def damage(p):
            with open(p, "r+b") as f:
                for page in (0, 1):
                    f.seek(page * 4096 + 16)
                    f.write(os.urandom(64))
        self.start_corrupt("meta", damage)

    # -- damaged pages inside a valid file

    def page_of_block(self, path, i, which):
        """The page holding the middle of document i's K (0) or V (1) block:
        a page of pure tensor bytes (an overflow page after the first)."""
        with open(path, "rb") as f:
            data = f.read()
        tokens, seed = self.acked[i]
        want = kv_of(seed, tokens)[which].tobytes()
        at = data.find(want[:256])
        self.assertGreater(at, 0, "block not found in the file")
        self.assertEqual(data[at:at + len(want)], want)
        return (at + len(want) // 2) // 4096

    def test_tensor_page_refused_at_start(self):
        path = os.path.join(self.src, "data.mdb")
        page = self.page_of_block(path, 3, 1)
        _, err = self.start_corrupt("vpage", lambda p: smash(p, page))
        self.assertIn("integrity walk", err)
        self.assertIn("collection c: doc 3: layer_pos 0 block V: checksum mismatch", err)

    def test_tensor_page_without_check_fails_reads(self):
        """--check-on-start off: msad serves; reads of the damaged block fail
        with DATA_LOSS instead of returning wrong bytes."""
        page = self.page_of_block(os.path.join(self.src, "data.mdb"), 3, 1)
        dst = os.path.join(self.tmp, "vpage-off")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.src, dst)
        smash(os.path.join(dst, "data.mdb"), page)
        for mode in ("off", "quick"):          # quick walks keys only: it passes too
            with Daemon(tmp=dst, data_dir=dst, args=["--check-on-start", mode]) as d:
                m = d.memory()
                err = self.assertCode(SC.DATA_LOSS, m.Get, pb.GetRequest(collection="c", ids=[3], with_tensors=True))
                for part in ('collection "c"', "document 3", "layer 0", "V block", "damaged"):
                    self.assertIn(part, err.details())
                q = tensor(np.random.default_rng(1).standard_normal((2, HQ, D)).astype(np.float32))
                err = self.assertCode(SC.DATA_LOSS, m.Attend, pb.AttendRequest(
                    collection="c", doc_ids=[3], layers=[pb.LayerQuery(layer=LAYER, routing_q=q, q=q)]))
                for part in ('collection "c"', "document 3", "layer 0", "V block"):
                    self.assertIn(part, err.details())
                # The record, its text and every other document are still served.
                g = m.Get(pb.GetRequest(collection="c", ids=[3], with_text=True, with_metadata=True))
                self.assertEqual(g.records[0].document.text, "doc 3 seed 3")
                self.assertEqual(self.list_ids(m, "c"), sorted(self.acked))
                others = sorted(i for i in self.acked if i != 3)
                g = m.Get(pb.GetRequest(collection="c", ids=others, with_tensors=True), timeout=60)
                for rec in g.records:
                    want_k, want_v = kv_of(self.acked[rec.info.id][1], self.acked[rec.info.id][0])
                    self.assertEqual(rec.document.layers[0].k.data, want_k.tobytes())
                    self.assertEqual(rec.document.layers[0].v.data, want_v.tobytes())
                problems = list(d.admin().Verify(pb.VerifyRequest()).problems)
                self.assertEqual(len(problems), 1, problems)
                self.assertIn("doc 3: layer 0 (pos 0) block V: checksum mismatch", problems[0])
        # A damaged K block: the index rebuild reads it, so even with the
        # check off msad refuses to start rather than index garbage.
        kpage = self.page_of_block(os.path.join(self.src, "data.mdb"), 6, 0)
        _, err = self.start_corrupt("kpage-off", lambda p: smash(p, kpage), args=["--check-on-start", "off"])
        for part in ("index rebuild", 'collection "c" document 6 layer 0 K block', "damaged"):
            self.assertIn(part, err)

    def test_structural_pages_refused(self):
        """Every branch and leaf page of the compacted copy (which has no free
        pages), and a sample of its tensor pages, overwritten in turn: exit 1
        naming data.mdb, never a signal, never served."""
        path = os.path.join(self.compact, "data.mdb")
        kinds = page_kinds(path)
        pages = [n for n, k in kinds.items() if k in ("branch", "leaf")]
        self.assertGreater(len(pages), 3)
        other = [n for n, k in kinds.items() if k not in ("branch", "leaf")]
        pages += other[::max(1, len(other) // 8)]
        reasons = {}
        for n in pages:
            rc, err = self.start_corrupt("struct%d" % n, lambda p, n=n: smash(p, n), src=self.compact)
            self.assertEqual(rc, 1)
            reason = "crashed" if "crashed" in err else "problems" if "integrity walk" in err else "open"
            reasons[reason] = reasons.get(reason, 0) + 1
        print("structural pages: %d of the compacted copy overwritten, all refused %s" % (len(pages), reasons))

    @unittest.skipUnless(os.environ.get("MSA_FAULT_PAGE_SCAN"),
                         "MSA_FAULT_PAGE_SCAN=1: overwrite every page in turn (slow)")
    def test_every_page_overwritten(self):
        """Each page overwritten with random bytes, in the store as written and
        in its compacted copy: refused at start (exit 1, naming data.mdb) or
        harmless (see the module doc). No crash, nothing silent."""
        results = {}
        for label, src in (("as written", self.src), ("compacted", self.compact)):
            npages = os.path.getsize(os.path.join(src, "data.mdb")) // 4096
            crashed, silent, refused, harmless = [], [], 0, []
            for n in range(2, npages):
                dst = os.path.join(self.tmp, "page%d" % n)
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
                smash(os.path.join(dst, "data.mdb"), n, seed=n)
                dd = Daemon(tmp=dst, data_dir=dst, start_timeout=30)
                try:
                    dd.start()
                except RuntimeError as e:
                    msg = str(e)
                    if "exited with 1 " not in msg or "data.mdb" not in msg:
                        crashed.append((n, msg.splitlines()[0], dd.log_tail(400)))
                    else:
                        refused += 1
                    dd.cleanup()
                    shutil.rmtree(dst, ignore_errors=True)
                    continue
                try:
                    mm = dd.memory()
                    self.assertEqual(list(dd.admin().Verify(pb.VerifyRequest(), timeout=60).problems), [])
                    self.reads_work(mm, "c", self.acked)
                    harmless.append(n)
                except (AssertionError, grpc.RpcError) as e:
                    silent.append((n, str(e)[:300]))
                rc = dd.stop()
                if rc != 0:
                    crashed.append((n, "serving", rc))
                dd.cleanup()
                shutil.rmtree(dst, ignore_errors=True)
            results[label] = (npages - 2, refused, len(harmless))
            self.assertEqual(crashed, [], label)
            self.assertEqual(silent, [], label)
            free = free_pages(src)
            if free is not None:                # every harmless page is a free page
                self.assertEqual(sorted(set(harmless) - free), [], label)
                results[label] += (len(free),)
            if label == "compacted":
                self.assertEqual(harmless, [], "a compacted store has no free pages")
        print("page scan: %s" % ", ".join("%s: %d pages, %d refused, %d harmless%s" % (
            k, *v[:3], " (all of them among its %d free pages)" % v[3] if len(v) > 3 else "")
            for k, v in results.items()))


def smash(path, page, seed=None):
    """Overwrites page `page` of path with random bytes (seeded when asked)."""
    rnd = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        f.seek(page * 4096)
        f.write(rnd.integers(0, 256, 4096, dtype=np.uint8).tobytes())


def free_pages(data_dir):
    """The page numbers on LMDB's freelist (mdb_stat -fff), or None without mdb_stat."""
    if not shutil.which("mdb_stat"):
        return None
    out = subprocess.run(["mdb_stat", "-fff", data_dir], capture_output=True, text=True, check=True).stdout
    free = set()
    for line in out.splitlines():
        m = re.fullmatch(r"\s+(\d+)(?:\[(\d+)\])?", line)
        if m:
            first, span = int(m.group(1)), int(m.group(2) or 1)
            free.update(range(first, first + span))
    return free


def page_kinds(path):
    """Page number -> "meta", "branch", "leaf", "overflow" (first page of a
    run) or "data" (the rest of a run) for a file without free pages, read
    from LMDB's page headers (pgno u64, pad u16, flags u16, pages u32)."""
    with open(path, "rb") as f:
        data = f.read()
    kinds, n, npages = {}, 0, len(data) // 4096
    while n < npages:
        pgno, _, flags, count = struct.unpack_from("<QHHI", data, n * 4096)
        if pgno == n and flags & 0x08:
            kinds[n] = "meta"
        elif pgno == n and flags & 0x04 and 0 < count <= npages - n:
            kinds[n] = "overflow"
            for j in range(1, count):
                kinds[n + j] = "data"
            n += count
            continue
        elif pgno == n and flags & 0x01:
            kinds[n] = "branch"
        elif pgno == n and flags & 0x02:
            kinds[n] = "leaf"
        else:
            kinds[n] = "unknown"
        n += 1
    return kinds


if __name__ == "__main__":
    unittest.main(verbosity=2)
