"""Security and limit tests of msad (issue "Reliability and security", item 5):
a real daemon on loopback driven by grpcio stubs generated from the proto.

- Auth, for EVERY method of msa.v1.Memory and msa.v1.Admin: no token, a
  malformed header and wrong tokens -> UNAUTHENTICATED (even with garbage
  bytes as the request: auth comes before decoding); a token of too low a
  scope -> PERMISSION_DENIED and nothing written; a token of enough scope ->
  the call succeeds. Scopes per SEMANTICS: read = Route, Attend, Get, List,
  ListCollections, DescribeCollection, Stats; write = read + Write; admin =
  everything. Health needs no token. (The constant-time comparison is
  unit-tested in tests/test_auth.c.)
- TLS with certificates made by `openssl` here: plaintext and untrusting
  clients refused, TLS client works; with --tls-client-ca: no client
  certificate or one from another CA refused, one signed by the CA accepted.
- Unix socket: mode 0660 even under umask 0.
- Loopback by default: without --listen msad listens on 127.0.0.1:7420 and on
  no other address (checked in /proc/net/tcp{,6} via its socket inodes).
- Backup path confinement: '/', '..', leading '.', empty, absolute, too long
  and symlinked names refused, nothing written outside the backup dir; no
  --backup-dir -> FAILED_PRECONDITION.
- Limits, each just over (status + field named) and just under (OK): message
  size, handler queue (concurrent calls), top_k, query tokens, ops per write,
  text and metadata bytes per document, exclude_ids, doc_ids, Get ids, List
  limit; and the flags that change them.

Run: ~/.cache/msad/venv/bin/python tests/test_security.py (MSA_BIN, MSA_SOURCE as in
daemon_util.py). Exits 77 (skipped) when msad has not been built.
"""
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
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

LAYERS = [3, 7]
H, HQ, D, P = 2, 4, 8, 4
MIB = 1 << 20


def schema():
    return pb.CollectionSchema(layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D,
                               chunk_tokens=P, kv_dtype=pb.F32, routing_dtype=pb.F32)


def doc(doc_id, tokens=4, text=None, meta=b"", seed=None):
    rng = np.random.default_rng(doc_id if seed is None else seed)
    c = (tokens + P - 1) // P
    layers = [pb.LayerKV(layer=l, k=tensor(rng.standard_normal((c, H, D))),
                         v=tensor(rng.standard_normal((c, H, D)))) for l in LAYERS]
    return pb.Document(id=doc_id, text="doc %d" % doc_id if text is None else text,
                       metadata=meta, tokens=tokens, layers=layers)


def query(T=1, layer=3, seed=0):
    q = tensor(np.random.default_rng(seed).standard_normal((T, HQ, D)))
    return pb.LayerQuery(layer=layer, routing_q=q, q=q)


def put(*docs):
    return [pb.WriteOp(put=d) for d in docs]


def md(tok):
    return [("authorization", "Bearer " + tok)]


def raw_call(channel, method, payload, timeout=10, metadata=None):
    f = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return f(payload, timeout=timeout, metadata=metadata)


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True)


class Case(GrpcCase):
    pass


# ==== auth =========================================================================

READ, WRITE, ADMIN = 1, 2, 3
# Every method of Memory and Admin with the scope SEMANTICS gives it.
METHODS = {
    "CreateCollection": ADMIN, "DropCollection": ADMIN, "ListCollections": READ,
    "DescribeCollection": READ, "Write": WRITE, "Get": READ, "List": READ, "Route": READ,
    "Attend": READ, "Stats": READ, "ReleaseSnapshot": READ, "Backup": ADMIN, "Verify": ADMIN,
}
TOKENS = {"rtok-0123456789abcdef": READ, "wtok-0123456789abcdef": WRITE,
          "atok-0123456789abcdef": ADMIN}
TOK = {v: k for k, v in TOKENS.items()}


class TestAuth(Case):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="msa-sec-")
        tf = os.path.join(cls.tmp, "tokens")
        with open(tf, "w") as f:
            f.write("# scopes\n" + "".join("%s %s\n" % (t, ["", "read", "write", "admin"][s])
                                           for t, s in TOKENS.items()))
        os.chmod(tf, 0o600)
        cls.backups = os.path.join(cls.tmp, "backups")
        cls.d = Daemon(args=["--tokens-file", tf, "--backup-dir", cls.backups]).start()
        cls.ch = cls.d.channel()
        cls.m, cls.a = cls.d.memory(cls.ch), cls.d.admin(cls.ch)
        adm = md(TOK[ADMIN])
        cls.m.CreateCollection(pb.CreateCollectionRequest(name="sec", schema=schema()), metadata=adm)
        cls.m.Write(pb.WriteRequest(collection="sec", ops=put(doc(1))), metadata=adm)
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        rc = cls.d.stop()
        cls.d.cleanup()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        assert rc == 0, "msad exit code %r" % rc

    def fresh(self):
        TestAuth.n += 1
        return TestAuth.n

    def call(self, method, metadata):
        """Calls method with a valid request (valid for an admin: names that do
        not exist yet, a collection that can be dropped)."""
        n = self.fresh()
        kw = dict(metadata=metadata, timeout=30)
        if method == "CreateCollection":
            return self.m.CreateCollection(pb.CreateCollectionRequest(name="new%d" % n,
                                                                      schema=schema()), **kw)
        if method == "DropCollection":
            name = "drop%d" % n
            self.m.CreateCollection(pb.CreateCollectionRequest(name=name, schema=schema()),
                                    metadata=md(TOK[ADMIN]))
            return self.m.DropCollection(pb.DropCollectionRequest(name=name), **kw)
        if method == "ListCollections":
            return self.m.ListCollections(pb.ListCollectionsRequest(), **kw)
        if method == "DescribeCollection":
            return self.m.DescribeCollection(pb.DescribeCollectionRequest(name="sec"), **kw)
        if method == "Write":
            return self.m.Write(pb.WriteRequest(collection="sec", ops=put(doc(1000 + n))), **kw)
        if method == "Get":
            return self.m.Get(pb.GetRequest(collection="sec", ids=[1], with_text=True), **kw)
        if method == "List":
            return self.m.List(pb.ListRequest(collection="sec"), **kw)
        if method == "Route":
            return self.m.Route(pb.RouteRequest(collection="sec", layers=[query()]), **kw)
        if method == "Attend":
            return self.m.Attend(pb.AttendRequest(collection="sec", layers=[query()]), **kw)
        if method == "Stats":
            return self.m.Stats(pb.StatsRequest(), **kw)
        if method == "ReleaseSnapshot":
            # A read token may hold a snapshot (any read call) and so release it.
            seq = self.m.List(pb.ListRequest(collection="sec", hold_snapshot_ms=5000),
                              metadata=md(TOK[READ])).snapshot_seq
            return self.m.ReleaseSnapshot(pb.ReleaseSnapshotRequest(snapshot_seq=seq), **kw)
        if method == "Backup":
            return self.a.Backup(pb.BackupRequest(name="b%d" % n), **kw)
        if method == "Verify":
            return self.a.Verify(pb.VerifyRequest(), **kw)
        raise AssertionError(method)

    def path(self, method):
        svc = "Admin" if method in ("Backup", "Verify") else "Memory"
        return "/msa.v1.%s/%s" % (svc, method)

    def test_every_method_is_listed(self):
        # The table above covers every method of both services in the proto.
        names = set()
        for svc in ("Memory", "Admin"):
            for m in pb.DESCRIPTOR.services_by_name[svc].methods:
                names.add(m.name)
        self.assertEqual(names, set(METHODS))

    def test_unauthenticated(self):
        bad = [None, [("authorization", "Basic " + TOK[ADMIN])], [("authorization", TOK[ADMIN])],
               [("authorization", "Bearer")], [("authorization", "Bearer ")],
               md("wrong"), md(TOK[ADMIN][:-1]), md(TOK[ADMIN] + "x"), md(TOK[ADMIN].upper()),
               md(TOK[READ] + " " + TOK[ADMIN]), [("x-token", TOK[ADMIN])]]
        for method in METHODS:
            for m in bad:
                with self.subTest(method=method, metadata=m):
                    err = self.assertCode(SC.UNAUTHENTICATED, self.call, method, m)
                    self.assertNotIn(TOK[ADMIN], err.details())
                    self.assertNotIn(TOK[READ], err.details())
            # Auth comes before decoding: garbage without a token is refused as such.
            with self.subTest(method=method, garbage=True):
                self.assertCode(SC.UNAUTHENTICATED, raw_call, self.ch, self.path(method),
                                b"\xff\xff\xff\xff")
                self.assertCode(SC.INVALID_ARGUMENT, raw_call, self.ch, self.path(method),
                                b"\xff\xff\xff\xff", metadata=md(TOK[ADMIN]))

    def test_scopes(self):
        for method, need in METHODS.items():
            for scope in (READ, WRITE, ADMIN):
                with self.subTest(method=method, scope=scope):
                    seq0 = self.m.Stats(pb.StatsRequest(), metadata=md(TOK[READ])).commit_seq
                    if scope >= need:
                        self.call(method, md(TOK[scope]))   # OK: raises on any error
                    else:
                        err = self.assertCode(SC.PERMISSION_DENIED, self.call, method,
                                              md(TOK[scope]))
                        self.assertNotIn(TOK[scope], err.details())
                        # Nothing was written (DropCollection's set-up create is one commit).
                        seq1 = self.m.Stats(pb.StatsRequest(), metadata=md(TOK[READ])).commit_seq
                        self.assertEqual(seq1 - seq0, 1 if method == "DropCollection" else 0)
        # Denied writes left nothing behind; the admin's and writer's did land.
        ids = {r.id for r in self.m.List(pb.ListRequest(collection="sec"),
                                         metadata=md(TOK[READ])).documents}
        self.assertIn(1, ids)
        self.assertEqual(len(ids), 3)  # doc 1 + Write by the write and admin tokens

    def test_lower_case_scheme(self):
        # RFC 6750: the scheme is case-insensitive.
        self.m.ListCollections(pb.ListCollectionsRequest(),
                               metadata=[("authorization", "bearer " + TOK[READ])])

    def test_health_without_token(self):
        h = self.d.health(self.ch)
        for m in (None, md("wrong")):
            r = h.Check(hpb.HealthCheckRequest(), metadata=m, timeout=10)
            self.assertEqual(r.status, hpb.HealthCheckResponse.SERVING)


# ==== TLS =============================================================================

@unittest.skipUnless(shutil.which("openssl"), "openssl not installed")
class TestTLS(Case):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="msa-tls-")
        t = cls.tmp
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        with open(os.path.join(t, "srv.ext"), "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        with open(os.path.join(t, "cli.ext"), "w") as f:
            f.write("extendedKeyUsage=clientAuth\n")
        for ca in ("ca", "other"):
            openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=msa test %s" % ca,
                    "-keyout", ca + ".key", "-out", ca + ".crt", cwd=t)
        for name, ca, ext, cn in (("srv", "ca", "srv.ext", "localhost"),
                                  ("cli", "ca", "cli.ext", "client"),
                                  ("rogue", "other", "cli.ext", "rogue")):
            openssl("req", *ec, "-subj", "/CN=" + cn, "-keyout", name + ".key", "-out",
                    name + ".csr", cwd=t)
            openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".crt", "-CAkey", ca + ".key",
                    "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", name + ".crt", cwd=t)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def f(self, name):
        return os.path.join(self.tmp, name)

    def read(self, name):
        with open(self.f(name), "rb") as fh:
            return fh.read()

    def secure(self, d, client=None, root="ca.crt"):
        kw = {}
        if client:
            kw = dict(private_key=self.read(client + ".key"),
                      certificate_chain=self.read(client + ".crt"))
        creds = grpc.ssl_channel_credentials(root_certificates=self.read(root), **kw)
        ch = grpc.secure_channel(d.addr, creds,
                                 options=[("grpc.ssl_target_name_override", "localhost")])
        d._channels.append(ch)
        return ch

    def works(self, d, ch):
        r = hpb_grpc.HealthStub(ch).Check(hpb.HealthCheckRequest(), timeout=10)
        self.assertEqual(r.status, hpb.HealthCheckResponse.SERVING)
        pb_grpc.MemoryStub(ch).ListCollections(pb.ListCollectionsRequest(), timeout=10)

    def refused(self, ch):
        self.assertCode(SC.UNAVAILABLE, hpb_grpc.HealthStub(ch).Check, hpb.HealthCheckRequest(),
                        timeout=5)
        self.assertCode(SC.UNAVAILABLE, pb_grpc.MemoryStub(ch).ListCollections,
                        pb.ListCollectionsRequest(), timeout=5)

    def test_server_tls(self):
        with Daemon(args=["--tls-cert", self.f("srv.crt"), "--tls-key", self.f("srv.key")]) as d:
            self.works(d, self.secure(d))
            self.works(d, self.secure(d, client="cli"))   # a client cert is simply not asked for
            self.refused(d.channel())                      # plaintext
            self.refused(self.secure(d, root="other.crt"))  # client does not trust the server

    def test_client_ca(self):
        with Daemon(args=["--tls-cert", self.f("srv.crt"), "--tls-key", self.f("srv.key"),
                          "--tls-client-ca", self.f("ca.crt")]) as d:
            self.works(d, self.secure(d, client="cli"))
            self.refused(self.secure(d))                   # no client certificate
            self.refused(self.secure(d, client="rogue"))   # signed by another CA
            self.refused(d.channel())                      # plaintext

    def test_bad_tls_flags_refuse_to_start(self):
        for args in (["--tls-cert", self.f("srv.crt")],
                     ["--tls-client-ca", self.f("ca.crt")],
                     ["--tls-cert", self.f("srv.crt"), "--tls-key", self.f("missing.key")]):
            with self.subTest(args=args):
                with tempfile.TemporaryDirectory() as tmp:
                    p = subprocess.run([msad_path(), "--data", tmp, "--listen", "127.0.0.1:0"] + args,
                                       capture_output=True, timeout=30)
                    self.assertNotEqual(p.returncode, 0)
                    self.assertNotIn(b"listening on", p.stdout)


# ==== listening addresses ===============================================================

def listening_sockets(pid):
    """[(family, ip, port)] of the TCP sockets in LISTEN state that pid holds."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    out = []
    for fam in ("tcp", "tcp6"):
        try:
            with open("/proc/net/" + fam) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[3] != "0A" or f[9] not in inodes:   # 0A = LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            if fam == "tcp":
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1]
                                                                for i in range(0, 16, 4)))
            out.append((fam, ip, int(hexport, 16)))
    return out


class DefaultListenDaemon(Daemon):
    """msad started without any --listen flag."""

    def cmdline(self):
        return [msad_path(), "--data", self.data_dir, "--log-level", "debug"] + self.args


class TestListen(Case):
    def test_loopback_by_default(self):
        for host in ("127.0.0.1", "0.0.0.0"):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as msad: TIME_WAIT is fine
                try:
                    s.bind((host, 7420))
                except OSError:
                    self.skipTest("port 7420 (the default) is in use here")
        d = DefaultListenDaemon()
        with d:
            self.assertEqual(d.addrs, ["127.0.0.1:7420"])
            socks = listening_sockets(d.proc.pid)
            self.assertTrue(socks, "no listening socket found for msad")
            for fam, ip, port in socks:
                self.assertIn(ip, ("127.0.0.1", "::1", "::ffff:127.0.0.1"),
                              "msad listens on %s:%d by default" % (ip, port))
            self.assertIn(7420, [p for _, _, p in socks])
            d.health().Check(hpb.HealthCheckRequest(), timeout=10)
            # Nothing answers on a non-loopback address of this host.
            ext = self.external_ip()
            if ext:
                with socket.socket() as s:
                    s.settimeout(2)
                    self.assertNotEqual(s.connect_ex((ext, 7420)), 0)

    @staticmethod
    def external_ip():
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("192.0.2.1", 9))   # TEST-NET: no packet is sent for UDP connect
                ip = s.getsockname()[0]
                return None if ip.startswith("127.") else ip
        except OSError:
            return None

    def test_unix_socket_0660_under_umask_0(self):
        tmp = tempfile.mkdtemp(prefix="msa-sock-")
        sock = os.path.join(tmp, "msad.sock")
        old = os.umask(0)   # inherited by msad: the mode must not depend on it
        try:
            d = Daemon(listen=["unix:" + sock])
            d.start()
        finally:
            os.umask(old)
        try:
            st = os.stat(sock)
            self.assertTrue(stat.S_ISSOCK(st.st_mode))
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
            r = d.health().Check(hpb.HealthCheckRequest(), timeout=10)
            self.assertEqual(r.status, hpb.HealthCheckResponse.SERVING)
            d.memory().ListCollections(pb.ListCollectionsRequest(), timeout=10)
            self.assertEqual(d.stop(), 0)
        finally:
            d.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)


# ==== backup confinement ===================================================================

def tree(root):
    """Every path under root (relative), with file sizes."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_size if n in fns else None
    return out


class TestBackupConfinement(Case):
    def test_names(self):
        tmp = tempfile.mkdtemp(prefix="msa-bk-")
        backups = os.path.join(tmp, "backups")
        outside = os.path.join(tmp, "outside")
        os.mkdir(backups)
        os.mkdir(outside)
        os.symlink(outside, os.path.join(backups, "link-dir"))
        os.symlink(os.path.join(outside, "target"), os.path.join(backups, "link-dangling"))
        d = Daemon(tmp=tmp, args=["--backup-dir", backups])
        try:
            d.start()
            m, a = d.memory(), d.admin()
            m.CreateCollection(pb.CreateCollectionRequest(name="bk", schema=schema()))
            m.Write(pb.WriteRequest(collection="bk", ops=put(doc(1))))
            before = tree(tmp)
            bad = ["", ".", "..", "../x", "../../etc/passwd", "a/b", "a/../b", "/", "/tmp/abs",
                   os.path.join(outside, "abs"), ".hidden", "..hidden", "x/", "x\\..\\..", "..\\x",
                   "a/.", "./a"]
            for name in bad:
                with self.subTest(name=name):
                    self.assertCode(SC.INVALID_ARGUMENT, a.Backup, pb.BackupRequest(name=name),
                                    contains="name")
            # Too long for the file system: refused as the client's error, not INTERNAL.
            self.assertCode(SC.INVALID_ARGUMENT, a.Backup, pb.BackupRequest(name="n" * 300),
                            contains="name")
            # Symlinks planted in the backup dir are not followed.
            for name in ("link-dir", "link-dangling"):
                with self.subTest(name=name):
                    self.assertCode(SC.ALREADY_EXISTS, a.Backup, pb.BackupRequest(name=name))
            log = d.log_tail(1 << 20)
            after = tree(tmp)
            changed = {k for k in set(before) | set(after)
                       if before.get(k, -1) != after.get(k, -1)
                       and not k.startswith("data") and k != "msad.log"}
            self.assertEqual(changed, set(), "files changed outside the data dir: %s" % changed)
            self.assertEqual(os.listdir(outside), [])
            # A good name lands inside, as a directory with the LMDB copy.
            b = a.Backup(pb.BackupRequest(name="good-1.bak"))
            self.assertGreater(b.bytes, 0)
            self.assertTrue(os.path.isfile(os.path.join(backups, "good-1.bak", "data.mdb")))
            self.assertCode(SC.ALREADY_EXISTS, a.Backup, pb.BackupRequest(name="good-1.bak"))
            self.assertEqual(os.listdir(outside), [])
            self.assertNotIn("AddressSanitizer", log)
            self.assertEqual(d.stop(), 0)
        finally:
            d.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)

    def test_no_backup_dir(self):
        with Daemon() as d:
            before = tree(d.tmp)
            for name in ("x", "../x"):
                self.assertCode(SC.FAILED_PRECONDITION, d.admin().Backup,
                                pb.BackupRequest(name=name), contains="backup")
            after = tree(d.tmp)
            self.assertEqual({k for k in after if k not in before and not k.startswith("data")},
                             set())


# ==== limits ==============================================================================

class TestLimits(Case):
    """Default limits on one daemon: just over -> the status with the field
    named; just under -> OK."""

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(args=["--sync", "nosync"]).start()
        cls.m = cls.d.memory()
        cls.m.CreateCollection(pb.CreateCollectionRequest(name="lim", schema=schema()))
        # 1024 documents, for doc_ids and Get ids (one write).
        cls.m.Write(pb.WriteRequest(collection="lim", ops=put(*[doc(i, seed=0)
                                                                 for i in range(1, 1025)])))

    @classmethod
    def tearDownClass(cls):
        rc = cls.d.stop()
        cls.d.cleanup()
        assert rc == 0, "msad exit code %r" % rc

    def test_top_k(self):
        r = self.m.Route(pb.RouteRequest(collection="lim", layers=[query()], top_k=1024))
        self.assertEqual(len(r.layers[0].doc_ids), 1024)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Route,
                        pb.RouteRequest(collection="lim", layers=[query()], top_k=1025),
                        contains="top_k")
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Attend,
                        pb.AttendRequest(collection="lim", layers=[query()], top_k=1025),
                        contains="top_k")

    def test_query_tokens(self):
        r = self.m.Route(pb.RouteRequest(collection="lim", layers=[query(T=65536)], top_k=2))
        self.assertEqual(len(r.layers[0].doc_ids), 2)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Route,
                        pb.RouteRequest(collection="lim", layers=[query(T=65537)]),
                        contains=["layers[0].routing_q", "65537", "65536"])
        ql = query(layer=7)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Attend,
                        pb.AttendRequest(collection="lim", layers=[ql, query(T=65537)],
                                         doc_ids=[1]),
                        contains=["layers[1].q", "65537"])

    def test_ops_per_write(self):
        ops = put(*[doc(i, seed=0) for i in range(5000, 5000 + 4096)])
        r = self.m.Write(pb.WriteRequest(collection="lim", ops=ops))
        self.assertEqual(len(r.versions), 4096)
        seq = r.commit_seq
        ops = put(*[doc(i, seed=0) for i in range(20000, 20000 + 4097)])
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write, pb.WriteRequest(collection="lim", ops=ops),
                        contains=["ops", "4097", "4096"])
        self.assertCode(SC.NOT_FOUND, self.m.Get, pb.GetRequest(collection="lim", ids=[20000]))
        self.assertEqual(self.m.Stats(pb.StatsRequest()).commit_seq, seq)
        # Deletes count as ops too.
        dels = [pb.WriteOp(delete_id=i) for i in range(5000, 5000 + 4097)]
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write,
                        pb.WriteRequest(collection="lim", ops=dels), contains="ops")

    def test_text_size(self):
        ok = "\u00e9" * (8 * MIB)            # 16 MiB of UTF-8 exactly
        self.assertEqual(len(ok.encode()), 16 * MIB)
        self.m.Write(pb.WriteRequest(collection="lim", ops=put(doc(30000, text=ok))))
        g = self.m.Get(pb.GetRequest(collection="lim", ids=[30000], with_text=True))
        self.assertEqual(g.records[0].document.text, ok)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write,
                        pb.WriteRequest(collection="lim",
                                        ops=put(doc(30001), doc(30002, text="x" * (16 * MIB + 1)))),
                        contains=["ops[1].put.text", str(16 * MIB + 1)])
        self.assertCode(SC.NOT_FOUND, self.m.Get, pb.GetRequest(collection="lim", ids=[30001]))

    def test_metadata_size(self):
        self.m.Write(pb.WriteRequest(collection="lim", ops=put(doc(31000, meta=b"\0" * MIB))))
        g = self.m.Get(pb.GetRequest(collection="lim", ids=[31000], with_metadata=True))
        self.assertEqual(len(g.records[0].document.metadata), MIB)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Write,
                        pb.WriteRequest(collection="lim", ops=put(doc(31001, meta=b"m" * (MIB + 1)))),
                        contains=["ops[0].put.metadata", str(MIB + 1)])

    def test_exclude_ids(self):
        ex = list(range(1, 100001))
        r = self.m.Route(pb.RouteRequest(collection="lim", layers=[query()], exclude_ids=ex))
        self.assertTrue(all(i > 100000 for i in r.layers[0].doc_ids))
        self.m.Attend(pb.AttendRequest(collection="lim", layers=[query()], exclude_ids=ex))
        ex.append(100001)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Route,
                        pb.RouteRequest(collection="lim", layers=[query()], exclude_ids=ex),
                        contains=["exclude_ids", "100001"])
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Attend,
                        pb.AttendRequest(collection="lim", layers=[query()], exclude_ids=ex),
                        contains=["exclude_ids", "100001"])

    def test_doc_ids(self):
        r = self.m.Attend(pb.AttendRequest(collection="lim", layers=[query()],
                                           doc_ids=list(range(1, 1025))))
        self.assertEqual(len(r.layers[0].doc_ids), 1024)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Attend,
                        pb.AttendRequest(collection="lim", layers=[query()],
                                         doc_ids=list(range(1, 1026))),
                        contains=["doc_ids", "1025"])

    def test_get_ids(self):
        ids = [1 + i % 1024 for i in range(100000)]
        r = self.m.Get(pb.GetRequest(collection="lim", ids=ids))
        self.assertEqual(len(r.records), 100000)
        self.assertCode(SC.INVALID_ARGUMENT, self.m.Get,
                        pb.GetRequest(collection="lim", ids=ids + [1]), contains=["ids", "100001"])

    def test_list_limit(self):
        self.m.List(pb.ListRequest(collection="lim", limit=100000))
        self.assertCode(SC.INVALID_ARGUMENT, self.m.List,
                        pb.ListRequest(collection="lim", limit=100001), contains="limit")


class TestLimitFlags(Case):
    def test_flags_change_the_limits(self):
        with Daemon(args=["--max-query-tokens", "16", "--max-write-ops", "3",
                          "--max-text-bytes", "10", "--max-metadata-bytes", "5",
                          "--max-ids", "4"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="f", schema=schema()))
            W = lambda *ops: m.Write(pb.WriteRequest(collection="f", ops=list(ops)))  # noqa: E731
            W(*put(doc(1, text="t" * 10, meta=b"m" * 5), doc(2), doc(3)))
            self.assertCode(SC.INVALID_ARGUMENT, W, *put(doc(4), doc(5), doc(6), doc(7)),
                            contains=["ops", "at most 3"])
            self.assertCode(SC.INVALID_ARGUMENT, W, *put(doc(4, text="t" * 11)),
                            contains="ops[0].put.text")
            self.assertCode(SC.INVALID_ARGUMENT, W, *put(doc(4, meta=b"m" * 6)),
                            contains="ops[0].put.metadata")
            m.Route(pb.RouteRequest(collection="f", layers=[query(T=16)], exclude_ids=[1, 2, 3, 4]))
            m.Attend(pb.AttendRequest(collection="f", layers=[query(T=16)]))
            self.assertCode(SC.INVALID_ARGUMENT, m.Route,
                            pb.RouteRequest(collection="f", layers=[query(T=17)]),
                            contains="layers[0].routing_q")
            self.assertCode(SC.INVALID_ARGUMENT, m.Attend,
                            pb.AttendRequest(collection="f", layers=[query(T=17)]),
                            contains="layers[0]")
            self.assertCode(SC.INVALID_ARGUMENT, m.Route,
                            pb.RouteRequest(collection="f", layers=[query()],
                                            exclude_ids=[1, 2, 3, 4, 5]), contains="exclude_ids")
            m.Get(pb.GetRequest(collection="f", ids=[1, 2, 3, 1]))
            self.assertCode(SC.INVALID_ARGUMENT, m.Get,
                            pb.GetRequest(collection="f", ids=[1, 2, 3, 1, 2]), contains="ids")

    def test_bad_limit_flags_exit_2(self):
        for args in (["--max-write-ops", "0"], ["--max-ids", "-1"], ["--max-text-bytes", "x"],
                     ["--max-query-tokens", str(1 << 30)]):
            with self.subTest(args=args):
                p = subprocess.run([msad_path()] + args, capture_output=True, timeout=30)
                self.assertEqual(p.returncode, 2, p.stderr)


class TestTransportLimits(Case):
    def test_message_size(self):
        with Daemon(args=["--max-message-mb", "1"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="msg", schema=schema()))
            base = pb.WriteRequest(collection="msg", ops=put(doc(1, text=""))).ByteSize()
            # The whole request (not just the text) is measured: pad to exactly the limit.
            for extra, code in ((0, None), (1, SC.RESOURCE_EXHAUSTED)):
                n = MIB - base + extra
                for _ in range(3):   # the length prefix of the text grows with it
                    req = pb.WriteRequest(collection="msg", ops=put(doc(1, text="x" * n)))
                    n += MIB + extra - req.ByteSize()
                req = pb.WriteRequest(collection="msg", ops=put(doc(1, text="x" * n)))
                self.assertEqual(req.ByteSize(), MIB + extra)
                if code is None:
                    m.Write(req)
                else:
                    self.assertCode(code, m.Write, req)
            self.assertEqual(len(m.Get(pb.GetRequest(collection="msg", ids=[1])).records), 1)

    def test_concurrent_calls(self):
        # One handler, one queue slot. A Route waiting on an unreachable min_seq
        # holds the handler; one more call queues (just under: it completes OK
        # once the handler is free); the next is RESOURCE_EXHAUSTED.
        with Daemon(args=["--handlers", "1", "--max-queue", "1"]) as d:
            m = d.memory()
            m.CreateCollection(pb.CreateCollectionRequest(name="busy", schema=schema()))
            slow = pb.RouteRequest(collection="busy", layers=[query()], min_seq=10 ** 6)
            f_slow = m.Route.future(slow, timeout=2.0)
            time.sleep(0.4)
            f_queued = m.ListCollections.future(pb.ListCollectionsRequest(), timeout=30)
            time.sleep(0.4)
            self.assertCode(SC.RESOURCE_EXHAUSTED, m.Stats, pb.StatsRequest(), timeout=10,
                            contains="too many concurrent requests")
            # Health is answered on the poller, never queued.
            d.health().Check(hpb.HealthCheckRequest(), timeout=5)
            self.assertEqual(f_slow.exception().code(), SC.DEADLINE_EXCEEDED)
            self.assertEqual([c.name for c in f_queued.result().collections], ["busy"])
            # Free again.
            for _ in range(100):
                try:
                    m.Stats(pb.StatsRequest(), timeout=10)
                    break
                except grpc.RpcError as e:
                    self.assertEqual(e.code(), SC.RESOURCE_EXHAUSTED)
                    time.sleep(0.05)
            else:
                self.fail("still busy after the slow call ended")


if __name__ == "__main__":
    unittest.main(verbosity=2)
