"""msactl against a real msad on loopback (temp data dir, free port).

Every command is run as a user would run it: collections (from flags and from JSON),
put from .npy files (pooled, raw, bf16 bits), docs list/get/delete (summaries checked
with NumPy), route/attend (checked against an fp64 reference computed here from the
tensors as stored), stats, backup, verify, health, bench (tiny shapes), --json output
parsed, exit codes (0 ok, 1 server error with the gRPC status name, 2 usage, 3 verify
problems / not serving) and --help of every command.

Run: ~/.cache/msad/venv/bin/python tests/test_msactl.py (MSA_BIN = directory with msad and msactl).
Exits 77 when msad or msactl is not built.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import BIN, Daemon, msad_path  # noqa: E402

MSACTL = os.path.join(BIN, "msactl")
if not (os.access(msad_path(), os.X_OK) and os.access(MSACTL, os.X_OK)):
    print("skip: msad or msactl not built in %s" % BIN)
    sys.exit(77)

LAYERS = [1, 4]
H, HQ, D, P = 2, 4, 8, 4


# The reference bf16 codecs (oracle.py: independent of msactl and the server).
from oracle import bf16_bits_to_f32 as from_bf16  # noqa: E402
from oracle import f32_to_bf16_bits as bf16_bits  # noqa: E402


def ref_scores(q, docs, layer):
    """COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX in float64: {id: score}."""
    q = np.asarray(q, np.float64)
    qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-300)
    G = HQ // H
    out = {}
    for did, layers in docs.items():
        k = np.asarray(layers[layer], np.float64)            # [C, H, D]
        kn = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-300)
        kj = kn[:, np.arange(HQ) // G, :]                    # [C, Hq, D]
        s = np.einsum("tjd,cjd->tjc", qn, kj).mean(axis=1)   # [T, C]
        out[did] = s.max(axis=0).max()
    return out


def ref_attend(q, ks, vs, scale=None):
    q = np.asarray(q, np.float64)
    K = np.concatenate(ks).astype(np.float64)
    V = np.concatenate(vs).astype(np.float64)
    G = HQ // H
    Kj, Vj = K[:, np.arange(HQ) // G], V[:, np.arange(HQ) // G]
    scale = scale or 1.0 / np.sqrt(D)
    logit = scale * np.einsum("tjd,rjd->tjr", q, Kj)
    m = logit.max(axis=2, keepdims=True)
    e = np.exp(logit - m)
    s = e.sum(axis=2, keepdims=True)
    return np.einsum("tjr,rjd->tjd", e / s, Vj), (m + np.log(s))[..., 0]


class MsactlTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="msactl-test-")
        cls.backups = os.path.join(cls.tmp, "backups")
        os.mkdir(cls.backups)
        cls.d = Daemon(args=["--backup-dir", cls.backups, "--backend", "cpu", "--threads", "2"]).start()
        cls.rng = np.random.default_rng(7)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.d.stop()
        finally:
            cls.d.cleanup()
            subprocess.run(["rm", "-rf", cls.tmp])

    # -- helpers ----------------------------------------------------------------------
    def run_ctl(self, *args, want=0, addr=True):
        cmd = [MSACTL] + (["--addr", self.d.addr] if addr else []) + [str(a) for a in args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if want is not None:
            self.assertEqual(p.returncode, want, "%s\nstdout: %s\nstderr: %s" % (cmd, p.stdout, p.stderr))
        return p

    def json_ctl(self, *args):
        p = self.run_ctl("--json", *args)
        return json.loads(p.stdout)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def save(self, name, a):
        p = self.path(name)
        np.save(p, a)
        return p

    def create_f32(self, name, *extra):
        self.run_ctl("collections", "create", name, "--layers", ",".join(map(str, LAYERS)),
                     "--kv-heads", H, "--query-heads", HQ, "--head-dim", D, "--chunk-tokens", P,
                     "--kv-dtype", "f32", "--routing-dtype", "f32", *extra)

    def put_docs(self, coll, n, start=1, tokens=(5, 8, 13, 4, 16, 9, 1, 12)):
        """Writes n pooled F32 docs through msactl put; returns {id: {layer: (k, v)}}."""
        docs = {}
        for i in range(n):
            did = start + i
            t = tokens[i % len(tokens)]
            c = -(-t // P)
            args = ["put", coll, "--id", did, "--tokens", t, "--text", "doc %d" % did]
            layers = {}
            for l in LAYERS:
                k = self.rng.standard_normal((c, H, D)).astype(np.float32)
                v = self.rng.standard_normal((c, H, D)).astype(np.float32)
                layers[l] = (k, v)
                args += ["--layer", "%d:%s:%s" % (l, self.save("k%d_%d.npy" % (did, l), k),
                                                   self.save("v%d_%d.npy" % (did, l), v))]
            self.run_ctl(*args)
            docs[did] = layers
        return docs

    # -- help and usage -----------------------------------------------------------------
    def test_help_and_usage(self):
        p = self.run_ctl("--help", addr=False)
        for cmd in ("collections", "docs", "put", "route", "attend", "stats", "backup", "verify", "bench"):
            self.assertIn(cmd, p.stdout)
            h = self.run_ctl(cmd, "--help", addr=False)
            self.assertIn("usage: msactl", h.stdout, cmd)
        self.assertIn("[C, H, D]", self.run_ctl("put", "--help").stdout)  # layout documented
        self.run_ctl(addr=False, want=2)
        self.assertIn("unknown command", self.run_ctl("frobnicate", want=2).stderr)
        self.run_ctl("--bogus", "stats", want=2)
        self.run_ctl("docs", "list", "c", "--limit", "x", want=2)
        self.run_ctl("collections", "create", "x", want=2)              # no schema given
        self.run_ctl("put", "c", "--id", "1", want=2)                   # no --layer
        self.run_ctl("route", "c", "--layer", "0:/nonexistent.npy", want=2)
        self.assertRegex(self.run_ctl("--version", addr=False).stdout, r"^msactl \d")

    def test_unreachable(self):
        p = subprocess.run([MSACTL, "--addr", "127.0.0.1:1", "--timeout", "5", "stats"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertIn("UNAVAILABLE", p.stderr)

    # -- collections ------------------------------------------------------------------
    def test_collections(self):
        self.run_ctl("collections", "create", "flags1", "--layers", "0,2-3", "--kv-heads", "2",
                     "--query-heads", "8", "--head-dim", "16", "--chunk-tokens", "32",
                     "--kv-dtype", "f16", "--routing-dtype", "i8", "--separate-router-keys",
                     "--similarity", "dot", "--head-reduce", "max", "--query-reduce", "last",
                     "--chunk-reduce", "mean", "--default-top-k", "5", "--model", "m@1")
        info = self.json_ctl("collections", "describe", "flags1")
        s = info["schema"]
        self.assertEqual(info["name"], "flags1")
        self.assertEqual(s["layers"], [0, 2, 3])
        self.assertEqual((s["kv_heads"], s["query_heads"], s["head_dim"], s["chunk_tokens"]), (2, 8, 16, 32))
        self.assertEqual((s["kv_dtype"], s["routing_dtype"]), ("F16", "I8"))
        self.assertTrue(s["separate_router_keys"])
        self.assertEqual((s["similarity"], s["head_reduce"], s["query_reduce"], s["chunk_reduce"]),
                         ("DOT", "HEAD_MAX", "QUERY_LAST", "CHUNK_MEAN"))
        self.assertEqual((s["default_top_k"], s["model"]), (5, "m@1"))
        self.assertEqual(info["documents"], 0)

        # JSON schema file: the describe output is accepted as it is; flags override.
        f = self.path("schema.json")
        with open(f, "w") as fh:
            json.dump(info, fh)
        self.run_ctl("collections", "create", "json1", "--schema-json", f, "--head-dim", "32")
        s2 = self.json_ctl("collections", "describe", "json1")["schema"]
        self.assertEqual(s2["head_dim"], 32)
        for k in ("layers", "kv_heads", "query_heads", "kv_dtype", "routing_dtype", "similarity",
                  "head_reduce", "query_reduce", "chunk_reduce", "model", "separate_router_keys"):
            self.assertEqual(s2[k], s[k], k)
        with open(f, "w") as fh:
            json.dump({"layers": [5], "kv_heads": 1, "query_heads": 1, "head_dim": 4,
                       "kv_dtype": "bf16", "head_reduce": "mean"}, fh)
        self.run_ctl("collections", "create", "json2", "--schema-json", f)
        s3 = self.json_ctl("collections", "describe", "json2")["schema"]
        self.assertEqual((s3["layers"], s3["kv_dtype"], s3["chunk_tokens"]), ([5], "BF16", 64))
        with open(f, "w") as fh:
            json.dump({"layers": [5], "bogus": 1}, fh)
        self.assertIn("bogus", self.run_ctl("collections", "create", "json3", "--schema-json", f, want=2).stderr)

        # list: table and JSON
        out = self.run_ctl("collections", "list").stdout
        self.assertIn("NAME", out)
        self.assertIn("flags1", out)
        names = [c["name"] for c in self.json_ctl("collections", "list")["collections"]]
        self.assertTrue({"flags1", "json1", "json2"} <= set(names))

        # errors: exit 1 with the status name; --json error object
        p = self.run_ctl("collections", "create", "flags1", "--layers", "0", "--kv-heads", "1",
                         "--query-heads", "1", "--head-dim", "4", want=1)
        self.assertIn("ALREADY_EXISTS", p.stderr)
        p = self.run_ctl("--json", "collections", "describe", "nope", want=1)
        self.assertEqual(json.loads(p.stdout)["error"]["code"], "NOT_FOUND")
        p = self.run_ctl("collections", "create", "bad", "--layers", "0", "--kv-heads", "3",
                         "--query-heads", "4", "--head-dim", "4", want=1)
        self.assertIn("INVALID_ARGUMENT", p.stderr)
        self.assertIn("query_heads", p.stderr)

        # drop
        self.assertEqual(self.json_ctl("collections", "drop", "json2")["dropped"], "json2")
        self.run_ctl("collections", "describe", "json2", want=1)
        self.run_ctl("collections", "drop", "json2", want=1)

    # -- put / docs ---------------------------------------------------------------------
    def test_put_docs(self):
        self.create_f32("docs")
        docs = self.put_docs("docs", 4)
        # text file + metadata file + JSON output, replace -> version 2
        tf, mf = self.path("text.txt"), self.path("meta.bin")
        with open(tf, "w") as fh:
            fh.write("hello, memory\nsecond line")
        with open(mf, "wb") as fh:
            fh.write(b"\x00\x01meta")
        k, v = docs[2][LAYERS[0]]
        k2, v2 = docs[2][LAYERS[1]]
        args = ["put", "docs", "--id", "2", "--tokens", "8", "--text-file", tf, "--metadata-file", mf,
                "--expect-version", "1",
                "--layer", "%d:%s:%s" % (LAYERS[0], self.save("a.npy", k), self.save("b.npy", v)),
                "--layer", "%d:%s:%s" % (LAYERS[1], self.save("c.npy", k2), self.save("d.npy", v2))]
        r = self.json_ctl(*args)
        self.assertEqual((r["id"], r["version"]), (2, 2))
        p = self.run_ctl(*args, want=1)  # expect_version 1 is stale now
        self.assertIn("FAILED_PRECONDITION", p.stderr)
        args[args.index("--expect-version"):args.index("--expect-version") + 2] = ["--expect-absent"]
        self.assertIn("ALREADY_EXISTS", self.run_ctl(*args, want=1).stderr)
        # wrong shape: INVALID_ARGUMENT naming the field
        bad = self.save("bad.npy", np.zeros((2, H, D + 1), np.float32))
        p = self.run_ctl("put", "docs", "--id", "9", "--tokens", "8",
                         "--layer", "%d:%s:%s" % (LAYERS[0], bad, bad),
                         "--layer", "%d:%s:%s" % (LAYERS[1], bad, bad), want=1)
        self.assertIn("INVALID_ARGUMENT", p.stderr)
        self.assertIn("layers", p.stderr)
        # NaN in a tensor
        nan = np.zeros((2, H, D), np.float32)
        nan[1, 0, 3] = np.nan
        nanf = self.save("nan.npy", nan)
        p = self.run_ctl("put", "docs", "--id", "9", "--tokens", "8",
                         "--layer", "%d:%s:%s" % (LAYERS[0], nanf, nanf),
                         "--layer", "%d:%s:%s" % (LAYERS[1], nanf, nanf), want=1)
        self.assertIn("INVALID_ARGUMENT", p.stderr)

        # docs list: table and JSON, paging
        out = self.run_ctl("docs", "list", "docs").stdout
        self.assertIn("VERSION", out)
        j = self.json_ctl("docs", "list", "docs", "--limit", "3")
        self.assertEqual([d["id"] for d in j["documents"]], [1, 2, 3])
        self.assertEqual(j["next_after_id"], 3)
        j = self.json_ctl("docs", "list", "docs", "--limit", "3", "--all")
        self.assertEqual([d["id"] for d in j["documents"]], [1, 2, 3, 4])
        self.assertEqual(j["documents"][1]["version"], 2)
        self.assertEqual(j["documents"][1]["text_bytes"], len("hello, memory\nsecond line"))

        # docs get: summaries equal NumPy's, text, metadata, --out-dir files as stored
        outdir = self.path("got")
        j = self.json_ctl("docs", "get", "docs", "2", "3", "--out-dir", outdir)
        d2, d3 = j["documents"]
        self.assertEqual(d2["info"]["id"], 2)
        self.assertEqual(d2["text"], "hello, memory\nsecond line")
        self.assertEqual(d2["metadata_hex"], "00016d657461")
        self.assertEqual(d3["text"], "doc 3")
        for rec in (d2, d3):
            did = rec["info"]["id"]
            self.assertEqual(sorted(l["layer"] for l in rec["layers"]), LAYERS)
            for l in rec["layers"]:
                kk, vv = docs[did][l["layer"]]
                for name, arr in (("k", kk), ("v", vv)):
                    s = l[name]
                    norms = np.linalg.norm(arr.astype(np.float64), axis=-1)
                    self.assertEqual(s["shape"], list(arr.shape))
                    self.assertEqual(s["chunks"], arr.shape[0])
                    self.assertEqual(s["dtype"], "F32")
                    self.assertAlmostEqual(s["norm_mean"], norms.mean(), places=4)
                    self.assertAlmostEqual(s["norm_min"], norms.min(), places=4)
                    self.assertAlmostEqual(s["norm_max"], norms.max(), places=4)
                    self.assertAlmostEqual(s["min"], float(arr.min()), places=5)
                    self.assertAlmostEqual(s["max"], float(arr.max()), places=5)
                    self.assertEqual(s["nonfinite"], 0)
                    got = np.load(s["file"])
                    np.testing.assert_array_equal(got, arr)
        human = self.run_ctl("docs", "get", "docs", "2").stdout
        self.assertIn("hello, memory", human)
        self.assertIn("norm", human)
        self.assertIn("finite", human)
        self.assertIn("NOT_FOUND", self.run_ctl("docs", "get", "docs", "77", want=1).stderr)

        # docs delete: atomic over the list; missing id -> NOT_FOUND and nothing deleted
        self.assertIn("NOT_FOUND", self.run_ctl("docs", "delete", "docs", "3", "99", want=1).stderr)
        self.assertEqual(len(self.json_ctl("docs", "list", "docs")["documents"]), 4)
        self.assertEqual(self.json_ctl("docs", "delete", "docs", "3-4")["deleted"], [3, 4])
        self.assertEqual([d["id"] for d in self.json_ctl("docs", "list", "docs")["documents"]], [1, 2])
        self.run_ctl("docs", "get", "docs", "3", want=1)

    def test_put_raw_and_bf16(self):
        # raw: the server mean-pools token rows; F32 storage makes the check exact-ish
        self.create_f32("raw")
        N = 10
        layers = {}
        args = ["put", "raw", "--id", "5", "--raw", "--text", "raw doc"]  # --tokens defaults to N
        for l in LAYERS:
            k = self.rng.standard_normal((N, H, D)).astype(np.float32)
            v = self.rng.standard_normal((N, H, D)).astype(np.float32)
            layers[l] = (k, v)
            args += ["--layer", "%d:%s:%s" % (l, self.save("rk%d.npy" % l, k), self.save("rv%d.npy" % l, v))]
        self.run_ctl(*args)
        j = self.json_ctl("docs", "get", "raw", "5", "--out-dir", self.path("rawout"))
        rec = j["documents"][0]
        self.assertEqual((rec["info"]["tokens"], rec["info"]["chunks"]), (N, 3))
        for l in rec["layers"]:
            k, v = layers[l["layer"]]
            for name, arr in (("k", k), ("v", v)):
                pooled = np.stack([arr[c * P:(c + 1) * P].mean(axis=0) for c in range(3)])
                np.testing.assert_allclose(np.load(l[name]["file"]), pooled, rtol=1e-5, atol=1e-6)

        # bf16 collection, bf16 bit files ('<u2') stored unchanged
        self.run_ctl("collections", "create", "bf", "--layers", "0", "--kv-heads", H, "--query-heads", HQ,
                     "--head-dim", D, "--chunk-tokens", P, "--kv-dtype", "bf16", "--routing-dtype", "bf16")
        k = self.rng.standard_normal((3, H, D)).astype(np.float32)
        v = self.rng.standard_normal((3, H, D)).astype(np.float32)
        kb, vb = bf16_bits(k), bf16_bits(v)
        self.run_ctl("put", "bf", "--id", "1", "--tokens", "12",
                     "--layer", "0:%s:%s" % (self.save("kb.npy", kb), self.save("vb.npy", vb)))
        # and f32 files converted client-side with --dtype bf16 (same rounding as the server)
        self.run_ctl("put", "bf", "--id", "2", "--dtype", "bf16",  # --tokens defaults to C * P
                     "--layer", "0:%s:%s" % (self.save("kf.npy", k), self.save("vf.npy", v)))
        j = self.json_ctl("docs", "get", "bf", "1", "2", "--out-dir", self.path("bfout"))
        for rec in j["documents"]:
            self.assertEqual(rec["info"]["tokens"], 12)
            l = rec["layers"][0]
            self.assertEqual(l["k"]["dtype"], "BF16")
            got = np.load(l["k"]["file"])
            self.assertEqual(got.dtype, np.uint16)
            np.testing.assert_array_equal(got, kb)
            np.testing.assert_array_equal(np.load(l["v"]["file"]), vb)
            self.assertAlmostEqual(l["k"]["max"], float(from_bf16(kb).max()), places=6)

    # -- route / attend -------------------------------------------------------------------
    def test_route_attend(self):
        self.create_f32("ra")
        docs = self.put_docs("ra", 8)
        keys = {did: {l: kv[0] for l, kv in layers.items()} for did, layers in docs.items()}
        T = 3
        rq = {l: self.rng.standard_normal((T, HQ, D)).astype(np.float32) for l in LAYERS}
        q = {l: self.rng.standard_normal((T, HQ, D)).astype(np.float32) for l in LAYERS}
        rqf = {l: self.save("rq%d.npy" % l, rq[l]) for l in LAYERS}
        qf = {l: self.save("q%d.npy" % l, q[l]) for l in LAYERS}

        j = self.json_ctl("route", "ra", "--top-k", "4", "--exclude", "3",
                          *sum((["--layer", "%d:%s" % (l, rqf[l])] for l in LAYERS), []))
        self.assertGreater(j["snapshot_seq"], 0)
        self.assertEqual(sorted(x["layer"] for x in j["layers"]), LAYERS)
        for lay in j["layers"]:
            ref = ref_scores(rq[lay["layer"]], {d: k for d, k in keys.items() if d != 3}, lay["layer"])
            want = sorted(ref.items(), key=lambda p: (-p[1], p[0]))[:4]
            self.assertEqual(lay["doc_ids"], [w[0] for w in want])
            np.testing.assert_allclose(lay["scores"], [w[1] for w in want], atol=1e-4)
        human = self.run_ctl("route", "ra", "--layer", "%d:%s" % (LAYERS[0], rqf[LAYERS[0]])).stdout
        self.assertIn("RANK", human)
        self.assertIn("SCORE", human)

        # a 2-D query file is one token
        j1 = self.json_ctl("route", "ra", "--top-k", "2", "--layer", "%d:%s" % (LAYERS[0], self.save("rq2d.npy", rq[LAYERS[0]][0])))
        ref = ref_scores(rq[LAYERS[0]][:1], keys, LAYERS[0])
        want = sorted(ref.items(), key=lambda p: (-p[1], p[0]))[:2]
        self.assertEqual(j1["layers"][0]["doc_ids"], [w[0] for w in want])

        # attend over explicit documents; out/lse files against fp64
        outdir = self.path("att")
        j = self.json_ctl("attend", "ra", "--doc-ids", "2,5", "--out-dir", outdir,
                          *sum((["--layer", "%d::%s" % (l, qf[l])] for l in LAYERS), []))
        for lay in j["layers"]:
            l = lay["layer"]
            self.assertEqual(sorted(lay["doc_ids"]), [2, 5])
            self.assertEqual(lay["out"]["shape"], [T, HQ, D])
            out = np.load(lay["out"]["file"])
            lse = np.load(lay["lse"]["file"])
            ro, rl = ref_attend(q[l], [docs[2][l][0], docs[5][l][0]], [docs[2][l][1], docs[5][l][1]])
            np.testing.assert_allclose(out, ro, atol=1e-4)
            np.testing.assert_allclose(lse, rl, atol=1e-4)
            self.assertEqual(lay["lse"]["neg_inf"], 0)

        # attend with routing: same ids as route; bf16 out written as '<u2' bits
        j = self.json_ctl("attend", "ra", "--top-k", "3", "--out-dtype", "bf16", "--scale", "0.5",
                          "--out-dir", outdir,
                          *sum((["--layer", "%d:%s:%s" % (l, rqf[l], qf[l])] for l in LAYERS), []))
        for lay in j["layers"]:
            l = lay["layer"]
            ref = ref_scores(rq[l], keys, l)
            want = [w[0] for w in sorted(ref.items(), key=lambda p: (-p[1], p[0]))[:3]]
            self.assertEqual(lay["doc_ids"], want)
            self.assertEqual(lay["out"]["dtype"], "BF16")
            out = from_bf16(np.load(lay["out"]["file"]))
            ro, rl = ref_attend(q[l], [docs[d][l][0] for d in want], [docs[d][l][1] for d in want], 0.5)
            np.testing.assert_allclose(out, ro, atol=2e-2, rtol=1e-2)
            np.testing.assert_allclose(np.load(lay["lse"]["file"]), rl, atol=1e-4)
        human = self.run_ctl("attend", "ra", "--doc-ids", "1", "--layer", "%d::%s" % (LAYERS[0], qf[LAYERS[0]])).stdout
        self.assertIn("lse", human)

        # errors
        self.assertIn("NOT_FOUND", self.run_ctl("attend", "ra", "--doc-ids", "404",
                                                "--layer", "%d::%s" % (LAYERS[0], qf[LAYERS[0]]), want=1).stderr)
        self.assertIn("INVALID_ARGUMENT", self.run_ctl("route", "ra", "--layer", "2:%s" % rqf[LAYERS[0]], want=1).stderr)
        self.assertIn("INVALID_ARGUMENT", self.run_ctl("route", "ra", "--top-k", "1025",
                                                       "--layer", "%d:%s" % (LAYERS[0], rqf[LAYERS[0]]), want=1).stderr)
        self.assertIn("NOT_FOUND", self.run_ctl("route", "nope", "--layer", "0:%s" % rqf[LAYERS[0]], want=1).stderr)
        self.run_ctl("attend", "ra", "--layer", "%d::%s" % (LAYERS[0], qf[LAYERS[0]]), want=2)  # no RQ, no ids
        # Within reach (msad refuses at once a min_seq no write could reach
        # in its 5 s wait): the 0.3 s client deadline passes first.
        p = self.run_ctl("--timeout", "0.3", "route", "ra", "--min-seq", str(1 << 20),
                         "--layer", "%d:%s" % (LAYERS[0], rqf[LAYERS[0]]), want=1)
        self.assertIn("DEADLINE_EXCEEDED", p.stderr)

    # -- stats / backup / verify / health ----------------------------------------------
    def test_admin(self):
        self.create_f32("adm")
        self.put_docs("adm", 2)
        out = self.run_ctl("stats").stdout
        for word in ("version", "backend", "commit_seq", "documents"):
            self.assertIn(word, out)
        s = self.json_ctl("stats")
        self.assertEqual(s["backend"], "cpu")
        self.assertGreater(s["commit_seq"], 0)
        self.assertGreaterEqual(s["documents"], 2)
        self.assertIsInstance(s["counters"], dict)

        b = self.json_ctl("backup", "b1")
        self.assertGreater(b["bytes"], 0)
        self.assertTrue(os.path.exists(os.path.join(self.backups, "b1")))
        self.assertIn("backup b2", self.run_ctl("backup", "b2", "--compact").stdout)
        self.assertTrue(os.path.exists(os.path.join(self.backups, "b2")))
        self.assertIn("INVALID_ARGUMENT", self.run_ctl("backup", "../evil", want=1).stderr)
        self.run_ctl("backup", want=2)

        v = self.json_ctl("verify", "adm")
        self.assertEqual((v["ok"], v["documents_checked"], v["problems"]), (True, 2, []))
        self.assertIn("OK", self.run_ctl("verify").stdout)
        self.assertIn("NOT_FOUND", self.run_ctl("verify", "nope", want=1).stderr)

        self.assertEqual(self.run_ctl("health").stdout.strip(), "SERVING")

    def test_token_file(self):
        tf = self.path("tokens")
        with open(tf, "w") as fh:
            fh.write("rtok read\natok admin\n")
        mine = self.path("mytoken")
        with open(mine, "w") as fh:
            fh.write("atok\n")
        rd = self.path("readtoken")
        with open(rd, "w") as fh:
            fh.write("rtok\n")
        d2 = Daemon(args=["--tokens-file", tf, "--backend", "cpu"]).start()
        try:
            base = [MSACTL, "--addr", d2.addr]
            p = subprocess.run(base + ["collections", "list"], capture_output=True, text=True)
            self.assertEqual(p.returncode, 1)
            self.assertIn("UNAUTHENTICATED", p.stderr)
            p = subprocess.run(base + ["--token-file", rd, "collections", "create", "x", "--layers", "0",
                                       "--kv-heads", "1", "--query-heads", "1", "--head-dim", "4"],
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 1)
            self.assertIn("PERMISSION_DENIED", p.stderr)
            p = subprocess.run(base + ["--token-file", mine, "collections", "create", "x", "--layers", "0",
                                       "--kv-heads", "1", "--query-heads", "1", "--head-dim", "4"],
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            env = dict(os.environ, MSA_TOKEN_FILE=rd, MSA_ADDR=d2.addr)
            p = subprocess.run([MSACTL, "collections", "list"], capture_output=True, text=True, env=env)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("x", p.stdout)
        finally:
            d2.stop()
            d2.cleanup()

    def test_tls(self):
        cert, key = self.path("cert.pem"), self.path("key.pem")
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                            "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.skipTest("openssl cannot make a certificate: " + r.stderr[-200:])
        d2 = Daemon(args=["--tls-cert", cert, "--tls-key", key, "--backend", "cpu"]).start()
        try:
            base = [MSACTL, "--addr", d2.addr, "--timeout", "10"]
            p = subprocess.run(base + ["--tls-ca", cert, "--tls-name", "localhost", "health"],
                               capture_output=True, text=True)
            self.assertEqual((p.returncode, p.stdout.strip()), (0, "SERVING"), p.stderr)
            p = subprocess.run(base + ["--tls-ca", cert, "stats"], capture_output=True, text=True)
            self.assertEqual(p.returncode, 0, p.stderr)          # IP SAN matches 127.0.0.1
            p = subprocess.run(base + ["stats"], capture_output=True, text=True)   # plaintext
            self.assertEqual(p.returncode, 1)
            self.assertIn("UNAVAILABLE", p.stderr)
            other = self.path("other.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                            self.path("okey.pem"), "-out", other, "-days", "2", "-subj", "/CN=localhost"],
                           capture_output=True, check=True)
            p = subprocess.run(base + ["--tls-ca", other, "--tls-name", "localhost", "stats"],
                               capture_output=True, text=True)                # untrusted server
            self.assertEqual(p.returncode, 1)
            self.assertIn("UNAVAILABLE", p.stderr)
            p = subprocess.run(base + ["--tls-ca", self.path("missing.pem"), "stats"],
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 2)
        finally:
            d2.stop()
            d2.cleanup()

    # -- bench ---------------------------------------------------------------------------
    def test_bench(self):
        small = ["--layers", "0,1", "--kv-heads", "2", "--query-heads", "4", "--head-dim", "16",
                 "--chunk-tokens", "16", "--doc-tokens", "256", "--query-tokens", "4",
                 "--top-k", "4", "--concurrency", "1,2", "--duration", "0.3", "--warmup", "1"]
        j = self.json_ctl("bench", "--tokens", "3000", "--batch-mb", "1", *small)
        self.assertEqual(j["store"]["tokens"], 3000)
        self.assertEqual(j["store"]["documents"], 12)
        self.assertEqual(j["store"]["chunks"], 11 * 16 + 12)     # 11 full docs + 184 tokens
        self.assertEqual(j["ingest"]["tokens_added"], 3000)
        self.assertGreaterEqual(j["ingest"]["batches"], 1)
        self.assertEqual(j["shape"]["layers"], 2)
        self.assertGreater(j["rpc_floor"]["requests"], 0)
        self.assertGreater(j["rpc_floor"]["p50_ms"], 0)
        self.assertGreater(j["bandwidth_floor"]["routing_bytes_per_query"], 0)
        for op in ("route", "attend"):
            self.assertEqual([x["concurrency"] for x in j[op]], [1, 2])
            for x in j[op]:
                self.assertGreater(x["requests"], 0)
                self.assertGreater(x["throughput_rps"], 0)
                self.assertLessEqual(x["p50_ms"], x["p99_ms"])
                self.assertGreater(x["p50_ms"], 0)  # no timing comparisons in tests: noisy hosts
        names = [c["name"] for c in self.json_ctl("collections", "list")["collections"]]
        self.assertNotIn("msactl_bench", names)  # dropped afterwards

        # --reuse --keep grows a kept collection
        j1 = self.json_ctl("bench", "--collection", "grow", "--tokens", "1024", "--reuse", "--keep",
                           "--ops", "route", "--requests", "5", *small)
        j2 = self.json_ctl("bench", "--collection", "grow", "--tokens", "2048", "--reuse", "--keep",
                           "--ops", "route", "--requests", "5", *small)
        self.assertEqual(j1["store"]["tokens"], 1024)
        self.assertEqual(j2["store"]["tokens"], 2048)
        self.assertEqual(j2["ingest"]["tokens_added"], 1024)
        self.assertEqual(j2["attend"], [])
        self.assertLessEqual(sum(x["requests"] for x in j2["route"][:1]), 5)
        out = self.run_ctl("bench", "--collection", "grow", "--tokens", "2048", "--reuse",
                           "--ops", "route", "--requests", "3", *small).stdout
        self.assertIn("rpc floor", out)
        self.assertIn("P99 ms", out)
        self.assertIn("grow", [c["name"] for c in self.json_ctl("collections", "list")["collections"]])


if __name__ == "__main__":
    unittest.main(verbosity=2)
