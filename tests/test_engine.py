#!/usr/bin/env python3
"""test_engine.py — the engine (daemon/engine.h) against the NumPy oracle.

Each test builds a scenario: a script of engine calls for build/bin/engine_probe
plus, for every call, what tests/oracle.py says must come back. The probe runs
the script in-process on a temporary data directory; the answers are compared.

Environment: MSA_BIN = folder with engine_probe (default /work/main/build/bin);
MSA_ENGINE_BACKEND = cpu (default), cuda or auto: the engine's backend;
MSA_ENGINE_GPU = JSON object of CUDA backend knobs for engine_probe ("shards",
"routing_kb", "cache_kb", "coalesce_us", "evict_grace_ms" (default 0 here: page out at
once), "lanes", "scratch_kb"); with the cuda
backend every scenario also checks that the device answered (no CPU fallback)
and MSA_ENGINE_GPU_EXPECT (comma list of counters, e.g. "page_outs,
cache_evictions") names counters that must end above zero over the whole run,
MSA_ENGINE_GPU_EXPECT_ZERO counters that must stay zero;
MSA_KEEP_TMP=1 keeps the scenario folders (scripts, .npy files, results);
MSA_TEST_SEED=n shifts every random seed (default 0: reproducible runs).
Exit status: 0 when every test passed; the last line is unittest's summary
followed by "N passed, N failed".

Tolerances (routing scores, relative to max|q|*max|k| per layer, 1 for COSINE):
F32 1e-4, F16/BF16 1e-2, I8 1e-3 (msad re-scores I8 candidates from the stored keys). Two documents whose oracle scores are closer
than that may come back in either order. Attention: out within a few ulps of
the out dtype times max|V|, lse within 1e-4 * (1 + scale * max|q| * max|k|).

Decisions this file relies on where SEMANTICS is silent:
  * Writes accept K/V/router_k in any of F32, F16, BF16 and round them to the
    stored dtype; I8 (or an unknown dtype) is INVALID_ARGUMENT.
  * A schema without separate_router_keys refuses router_k; one with it
    requires router_k for every layer.
  * Error messages name the field: we check the message contains the path the
    oracle names (e.g. "ops[2].put.layers[1].k", "top_k", "layers[0].routing_q").
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle as O  # noqa: E402

BIN = os.environ.get("MSA_BIN", "/work/main/build/bin")
BACKEND = os.environ.get("MSA_ENGINE_BACKEND", "cpu")   # cpu | cuda | auto
GPU_KNOBS = json.loads(os.environ.get("MSA_ENGINE_GPU", "{}"))
GPU_EXPECT = [c for c in os.environ.get("MSA_ENGINE_GPU_EXPECT", "").split(",") if c]
GPU_EXPECT_ZERO = [c for c in os.environ.get("MSA_ENGINE_GPU_EXPECT_ZERO", "").split(",") if c]
GPU_TOTALS: dict = {}                                    # counters summed over every probe run
PROBE = os.path.join(BIN, "engine_probe")
KEEP = os.environ.get("MSA_KEEP_TMP") == "1"
SEED = int(os.environ.get("MSA_TEST_SEED", "0"))        # vary the random stores

ROUTE_TOL = {O.F32: 1e-4, O.F16: 1e-2, O.BF16: 1e-2, O.I8: 1e-3}  # I8: re-scored from stored keys
OUT_TOL = {O.F32: 2e-5, O.F16: 2e-3, O.BF16: 1.6e-2}
STORE_ULP = {O.F32: 2.0 ** -23, O.F16: 2.0 ** -10, O.BF16: 2.0 ** -7}
DT_NAMES = O.DTYPE_NAMES


def ceil_div(a, b):
    return -(-a // b)


class ProbeFailure(AssertionError):
    pass


# ==== a scenario: script + expectations ==========================================

class Scenario:
    """Collects engine calls and, for each, a check of its result against the
    oracle state at the time the call was added."""

    def __init__(self, tc: unittest.TestCase, name: str, seed: int = 0):
        self.tc = tc
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.prng = random.Random(seed)
        self.dir = tempfile.mkdtemp(prefix=f"msa_{name}_")
        self.inp = os.path.join(self.dir, "in")
        self.backup_dir = os.path.join(self.dir, "backups")
        os.makedirs(self.inp)
        os.makedirs(self.backup_dir)
        self.data = os.path.join(self.dir, "data")
        self.ops = []
        self.checks = []           # (op index, description, fn(result, outdir))
        self.store = O.Store()
        self.orc = O.Oracle()
        self.nfile = 0
        self.runs = 0
        self.errors = []
        self.twins = []            # groups of ids with identical stored keys

    def cleanup(self):
        if not KEEP:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- files --
    def save(self, arr: np.ndarray) -> str:
        self.nfile += 1
        name = f"t{self.nfile}.npy"
        np.save(os.path.join(self.inp, name), arr)
        return name

    def tensor(self, dtype: int, values) -> tuple:
        """Returns (file, encoded array)."""
        enc = O.encode(dtype, values)
        return self.save(enc), enc

    # -- plumbing --
    def add(self, op: dict, desc: str, check=None):
        self.ops.append(op)
        if check:
            self.checks.append((len(self.ops) - 1, desc, check))
        return len(self.ops) - 1

    def run(self, data_dir: str = None):
        """Runs the collected ops, checks every answer, clears the op list."""
        self.runs += 1
        out = os.path.join(self.dir, f"out{self.runs}")
        os.makedirs(out)
        script = {"data_dir": data_dir or self.data, "backup_dir": self.backup_dir,
                  "backend": BACKEND, "threads": 2, "nosync": True, "min_seq_wait_ms": 300,
                  "gpu": GPU_KNOBS, "ops": self.ops}
        spath = os.path.join(self.inp, f"script{self.runs}.json")
        with open(spath, "w") as f:
            json.dump(script, f)
        t0 = time.time()
        p = subprocess.run([PROBE, spath, out], capture_output=True, text=True, timeout=300)
        self.elapsed = time.time() - t0
        if p.returncode != 0:
            raise ProbeFailure(f"{self.name}: engine_probe exited {p.returncode}\n"
                               f"{p.stderr[-3000:]}")
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
        self.tc.assertEqual(res["open_code"], "OK", res.get("open_msg"))
        results = res["results"]
        self.tc.assertEqual(len(results), len(self.ops))
        if BACKEND == "cuda":
            g = res.get("gpu")
            self.tc.assertIsNotNone(g, "cuda backend: the probe reported no device counters")
            for k, v in g.items():
                GPU_TOTALS[k] = GPU_TOTALS.get(k, 0) + v
            self.tc.assertEqual(g["routes_fallback"], 0, f"{self.name}: routes fell back to the CPU")
            self.tc.assertEqual(g["attends_fallback"], 0, f"{self.name}: attends fell back to the CPU")
        for idx, desc, fn in self.checks:
            r = results[idx]
            try:
                fn(r, out)
            except AssertionError as e:
                self.errors.append(f"[{self.name} run {self.runs} op {idx} {self.ops[idx]['op']}"
                                   f" {desc}] {e}")
        self.ops, self.checks = [], []
        if self.errors:
            msg = "\n".join(self.errors[:12])
            if len(self.errors) > 12:
                msg += f"\n... and {len(self.errors) - 12} more"
            raise AssertionError(msg)
        return results

    # -- expectations helpers --
    @staticmethod
    def expect_code(code: str, field: str = None):
        def check(r, out):
            if r["code"] != code:
                raise AssertionError(f"code {r['code']} ({r['msg']!r}), want {code}")
            if field and field not in r["msg"]:
                raise AssertionError(f"message {r['msg']!r} does not name {field!r}")
        return check

    # ==== calls ====================================================================

    def create(self, name: str, schema: O.Schema, expect: str = None, field: str = None,
               raw_schema: dict = None):
        sj = raw_schema if raw_schema is not None else schema.to_json()
        try:
            c = self.store.create(name, schema)
            want, wfield, info = "OK", None, c.info()
        except O.StoreError as e:
            want, wfield, info = e.code, e.field, None
        if expect:
            self.tc.assertEqual(expect, want, f"oracle disagrees with test on create {name}")
        field = field or (wfield if want == "EINVAL" else None)
        s = schema.with_defaults()

        def check(r, out):
            Scenario.expect_code(want, field)(r, out)
            if want == "OK":
                got = r["info"]
                for k in ("name", "documents", "chunks", "tokens", "bytes", "created_seq"):
                    if got[k] != info[k]:
                        raise AssertionError(f"info.{k} {got[k]}, want {info[k]}")
                gs = got["schema"]
                if (gs["layers"] != s.layers or gs["kv_dtype"] != DT_NAMES[s.kv_dtype] or
                        gs["routing_dtype"] != DT_NAMES[s.routing_dtype] or
                        gs["default_top_k"] != s.default_top_k):
                    raise AssertionError(f"schema came back as {gs}")
        self.add({"op": "create", "name": name, "schema": sj}, f"create {name}", check)

    def drop(self, name: str):
        try:
            seq = self.store.drop(name)
            want = "OK"
        except O.StoreError as e:
            want, seq = e.code, None

        def check(r, out):
            Scenario.expect_code(want)(r, out)
            if want == "OK" and r["commit_seq"] != seq:
                raise AssertionError(f"commit_seq {r['commit_seq']}, want {seq}")
        self.add({"op": "drop", "name": name}, f"drop {name}", check)

    def make_put(self, coll: str, doc_id, tokens: int = None, raw: bool = None,
                 dtype: int = None, scale: float = 1.0, values=None, layers=None,
                 text: str = None, metadata: str = None):
        """A put op for the collection's schema: (json op, oracle Op)."""
        s = self.store.colls[coll].schema
        H, D, P = s.kv_heads, s.head_dim, s.chunk_tokens
        if tokens is None:
            tokens = self.prng.randint(1, 3 * P + 2) if P <= 8 else self.prng.randint(1, 2 * P + 5)
        if raw is None:
            raw = self.prng.random() < 0.4
        rows = tokens if raw else ceil_div(tokens, P)
        jl, ol = [], []
        for layer in (layers if layers is not None else s.layers):
            def one():
                dt = dtype or self.prng.choice([O.F32, O.F16, O.BF16])
                x = (values[layer] if values is not None else
                     self.rng.standard_normal((rows, H, D)).astype(np.float32) * scale)
                f, enc = self.tensor(dt, x)
                return f, enc, dt
            kf, ke, kd = one()
            vf, ve, vd = one()
            lj = {"layer": layer, "k": kf, "v": vf}
            pl = O.PutLayer(layer, ke, ve, None, kd, vd)
            if s.separate_router_keys:
                rf, re_, rd = one()
                lj["router_k"] = rf
                pl.router_k, pl.r_dtype = re_, rd
            jl.append(lj)
            ol.append(pl)
        order = list(range(len(jl)))
        self.prng.shuffle(order)       # any layer order is fine
        jl = [jl[i] for i in order]
        ol = [ol[i] for i in order]
        text = text if text is not None else f"doc {doc_id} text \u00e9"
        metadata = metadata if metadata is not None else f"meta-{doc_id}"
        jput = {"id": str(doc_id), "text": text, "metadata": metadata, "tokens": tokens,
                "raw": raw, "layers": jl}
        op = O.Op("put", int(doc_id), text.encode(), metadata.encode(), tokens, raw, ol)
        return {"put": jput}, op

    def write(self, coll: str, items, model: str = "", expect: str = None, field: str = None):
        """items: list of (json op, oracle Op). Applies to the oracle and adds a check."""
        ops_json, ops = [], []
        for j, o in items:
            j = dict(j)
            if o.expect_version:
                j["expect_version"] = o.expect_version
            if o.expect_absent:
                j["expect_absent"] = True
            ops_json.append(j)
            ops.append(o)
        before = self.store.clone()
        try:
            seq, versions = self.store.write(coll, ops, model)
            want, wfield = "OK", None
        except O.StoreError as e:
            self.store = before
            want, wfield, seq, versions = e.code, e.field, None, None
        if expect:
            self.tc.assertEqual(expect, want,
                                f"oracle disagrees with the test on a write: {wfield}")
        field = field if field is not None else wfield

        def check(r, out):
            Scenario.expect_code(want, field)(r, out)
            if want == "OK":
                if r["commit_seq"] != seq:
                    raise AssertionError(f"commit_seq {r['commit_seq']}, want {seq}")
                if r["versions"] != versions:
                    raise AssertionError(f"versions {r['versions']}, want {versions}")
        j = {"op": "write", "collection": coll, "ops": ops_json}
        if model:
            j["model"] = model
        self.add(j, f"write {len(ops)} ops", check)
        return want

    def delete_op(self, doc_id, expect_version=0):
        j = {"delete": str(doc_id)}
        return j, O.Op("delete", int(doc_id), expect_version=expect_version)

    def seq_check(self):
        seq = self.store.seq

        def check(r, out):
            if r["commit_seq"] != seq:
                raise AssertionError(f"commit_seq {r['commit_seq']}, want {seq}")
        self.add({"op": "seq"}, "seq", check)

    def query(self, dtype: int, T: int, Hq: int, D: int, scale: float = 1.0):
        x = self.rng.standard_normal((T, Hq, D)).astype(np.float32) * scale
        f, enc = self.tensor(dtype, x)
        return f, O.decode(dtype, enc)

    def route(self, coll: str, T: int = None, top_k: int = 0, exclude=(), qdtype: int = None,
              layers=None, model: str = "", attend: bool = False, doc_ids=None,
              out_dtype: int = 0, scale_attn: float = 0.0, min_seq: int = 0,
              qscale: float = 1.0):
        c = self.store.colls[coll]
        s = c.schema
        docs = c.docs
        T = T or self.prng.randint(1, 3)
        layers = layers if layers is not None else s.layers
        lj, expects = [], []
        for layer in layers:
            qd = qdtype or self.prng.choice([O.F32, O.F16, O.BF16])
            qf, qv = self.query(qd, T, s.query_heads, s.head_dim, qscale)
            item = {"layer": layer, "routing_q": qf}
            av = None
            if attend:
                af, av = self.query(self.prng.choice([O.F32, O.F16, O.BF16]), T, s.query_heads,
                                    s.head_dim)
                item["q"] = af
            lj.append(item)
            k = top_k or s.default_top_k
            ranked, bound = self.orc.route_layer(s, docs, layer, qv, k, exclude)
            expects.append((layer, ranked, bound, k, av))
        j = {"op": "attend" if attend else "route", "collection": coll, "layers": lj}
        if top_k:
            j["top_k"] = top_k
        if exclude:
            j["exclude_ids"] = [str(x) for x in exclude]
        if model:
            j["model"] = model
        if min_seq:
            j["min_seq"] = min_seq
        if attend:
            if doc_ids is not None:
                j["doc_ids"] = [str(x) for x in doc_ids]
            if scale_attn:
                j["scale"] = scale_attn
            if out_dtype:
                j["out_dtype"] = DT_NAMES[out_dtype]
        snap = self.store.seq
        tol_rel = ROUTE_TOL[s.routing_dtype]
        orc = self.orc
        twins = [sorted(set(g) - set(exclude)) for g in self.twins]

        def check(r, out):
            Scenario.expect_code("OK")(r, out)
            if r["snapshot_seq"] != snap:
                raise AssertionError(f"snapshot_seq {r['snapshot_seq']}, want {snap}")
            got = {l["layer"]: l for l in r["layers"]}
            if sorted(got) != sorted(layers):
                raise AssertionError(f"layers {sorted(got)}, want {sorted(layers)}")
            for layer, ranked, bound, k, av in expects:
                gl = got[layer]
                if doc_ids is not None:
                    ids = [int(x) for x in gl["doc_ids"]]
                    if sorted(ids) != sorted(doc_ids):
                        raise AssertionError(f"layer {layer}: doc_ids {ids}, want {doc_ids}")
                    if gl["scores"]:
                        raise AssertionError("scores given although doc_ids were given")
                else:
                    ids = check_ranking(layer, gl, ranked, bound, k, tol_rel, twins)
                if attend:
                    check_attention(orc, s, docs, layer, ids, av, gl, out, out_dtype, scale_attn,
                                    bound_q_k(s, av, docs, layer, ids))
        self.add(j, f"{j['op']} T={T} top_k={top_k} exclude={list(exclude)[:4]}", check)

    def attend(self, coll: str, **kw):
        self.route(coll, attend=True, **kw)

    def get(self, coll: str, ids, with_tensors=True, layers=None, with_text=True,
            with_metadata=True):
        c = self.store.colls[coll]
        s = c.schema
        docs = c.docs
        snap = self.store.seq
        want_layers = layers if layers else s.layers

        def check(r, out):
            Scenario.expect_code("OK")(r, out)
            if r["snapshot_seq"] != snap:
                raise AssertionError(f"snapshot_seq {r['snapshot_seq']}, want {snap}")
            recs = r["records"]
            if [int(x["info"]["id"]) for x in recs] != [int(i) for i in ids]:
                raise AssertionError("records not in request order")
            for rec in recs:
                d = docs[int(rec["info"]["id"])]
                check_info(rec["info"], d, s)
                want_text = d.text.decode() if with_text else ""
                if rec["text"] != want_text:
                    raise AssertionError(f"text {rec['text']!r}, want {want_text!r}")
                want_meta = d.metadata if with_metadata else b""
                if bytes.fromhex(rec["metadata_hex"]) != want_meta:
                    raise AssertionError("metadata differs")
                if not with_tensors:
                    if rec["layers"]:
                        raise AssertionError("tensors returned without with_tensors")
                    continue
                gl = {l["layer"]: l for l in rec["layers"]}
                if sorted(gl) != sorted(want_layers):
                    raise AssertionError(f"layers {sorted(gl)}, want {want_layers}")
                for layer in want_layers:
                    l = gl[layer]
                    check_stored(out, l["k"], d.k[layer], s.kv_dtype, f"doc {d.id} k", d)
                    check_stored(out, l["v"], d.v[layer], s.kv_dtype, f"doc {d.id} v", d)
                    if s.separate_router_keys:
                        check_stored(out, l["router_k"], d.r[layer], s.router_store_dtype,
                                     f"doc {d.id} router_k", d)
                    elif l["router_k"] is not None:
                        raise AssertionError("router_k returned without separate_router_keys")
        j = {"op": "get", "collection": coll, "ids": [str(i) for i in ids],
             "with_text": with_text, "with_metadata": with_metadata, "with_tensors": with_tensors}
        if layers:
            j["layers"] = layers
        self.add(j, f"get {list(ids)[:5]}", check)

    def list(self, coll: str, after_id=0, limit=0):
        c = self.store.colls[coll]
        s = c.schema
        docs = dict(c.docs)
        snap = self.store.seq
        all_ids = sorted(i for i in docs if i > after_id)
        lim = limit or 1000
        want_ids = all_ids[:lim]
        want_next = want_ids[-1] if len(all_ids) > lim else 0

        def check(r, out):
            Scenario.expect_code("OK")(r, out)
            got = [int(d["id"]) for d in r["docs"]]
            if got != want_ids:
                raise AssertionError(f"ids {got[:20]}, want {want_ids[:20]}")
            if int(r["next_after_id"]) != want_next:
                raise AssertionError(f"next_after_id {r['next_after_id']}, want {want_next}")
            if r["snapshot_seq"] != snap:
                raise AssertionError(f"snapshot_seq {r['snapshot_seq']}, want {snap}")
            for d in r["docs"]:
                check_info(d, docs[int(d["id"])], s)
        j = {"op": "list", "collection": coll, "after_id": after_id}
        if limit:
            j["limit"] = limit
        self.add(j, f"list after {after_id} limit {limit}", check)

    def describe(self, coll: str):
        info = self.store.colls[coll].info() if coll in self.store.colls else None

        def check(r, out):
            if info is None:
                Scenario.expect_code("ENOTFOUND")(r, out)
                return
            Scenario.expect_code("OK")(r, out)
            for k, v in info.items():
                if r["info"][k] != v:
                    raise AssertionError(f"info.{k} {r['info'][k]}, want {v}")
        self.add({"op": "describe", "name": coll}, f"describe {coll}", check)

    def stats_and_verify(self):
        colls = self.store.colls.values()
        n_docs = sum(len(c.docs) for c in colls)
        n_chunks = sum(c.info()["chunks"] for c in colls)
        n_colls = len(self.store.colls)
        seq = self.store.seq

        def check_stats(r, out):
            Scenario.expect_code("OK")(r, out)
            for k, v in (("commit_seq", seq), ("collections", n_colls), ("documents", n_docs),
                         ("chunks", n_chunks)):
                if r[k] != v:
                    raise AssertionError(f"stats.{k} {r[k]}, want {v}")

        def check_verify(r, out):
            Scenario.expect_code("OK")(r, out)
            if r["problems"]:
                raise AssertionError(f"verify problems: {r['problems'][:5]}")
            if r["documents_checked"] != n_docs:
                raise AssertionError(f"documents_checked {r['documents_checked']}, want {n_docs}")
        self.add({"op": "stats"}, "stats", check_stats)
        self.add({"op": "verify"}, "verify", check_verify)

    def list_collections(self):
        want = sorted(self.store.colls)

        def check(r, out):
            Scenario.expect_code("OK")(r, out)
            got = sorted(c["name"] for c in r["collections"])
            if got != want:
                raise AssertionError(f"collections {got}, want {want}")
        self.add({"op": "list_collections"}, "list_collections", check)

    def reopen(self, data_dir=None):
        j = {"op": "reopen"}
        if data_dir:
            j["data_dir"] = data_dir
        self.add(j, "reopen", Scenario.expect_code("OK"))

    def call(self, op: dict, code: str, field: str = None, desc: str = None):
        """Any call with an expected code (and field named in the message)."""
        self.add(op, desc or f"{op['op']} -> {code}", Scenario.expect_code(code, field))


# ==== comparisons ====================================================================

def check_ranking(layer, gl, ranked, bound, k, tol_rel, twins=()):
    tol = tol_rel * bound + 1e-6
    ids = [int(x) for x in gl["doc_ids"]]
    scores = [float(x) for x in gl["scores"]]
    oscore = {i: s for s, i in ranked}
    n = min(k, len(ranked))
    if len(ids) != n or len(scores) != n:
        raise AssertionError(f"layer {layer}: {len(ids)} ids, {len(scores)} scores, want {n}")
    if len(set(ids)) != n:
        raise AssertionError(f"layer {layer}: duplicate ids {ids}")
    for i, s in zip(ids, scores):
        if i not in oscore:
            raise AssertionError(f"layer {layer}: id {i} is not a candidate (excluded/absent)")
        if abs(s - oscore[i]) > tol:
            raise AssertionError(f"layer {layer}: id {i} score {s:.7g}, oracle {oscore[i]:.7g} "
                                 f"(tol {tol:.3g})")
    for a in range(n - 1):
        if scores[a] < scores[a + 1] or (scores[a] == scores[a + 1] and ids[a] > ids[a + 1]):
            raise AssertionError(f"layer {layer}: order broken at {a}: "
                                 f"{list(zip(ids, scores))[a:a + 2]}")
        if oscore[ids[a]] < oscore[ids[a + 1]] - 2 * tol:
            raise AssertionError(f"layer {layer}: oracle order broken at {a}")
    # Documents with identical keys score exactly the same: smaller id first,
    # and a larger twin is never chosen over a smaller one.
    for g in twins:
        pos = [ids.index(i) if i in ids else None for i in g]
        for a in range(len(g) - 1):
            if pos[a + 1] is not None and (pos[a] is None or pos[a] > pos[a + 1]):
                raise AssertionError(f"layer {layer}: twins {g} at positions {pos}")
            if pos[a] is not None and pos[a + 1] is not None and \
                    scores[pos[a]] != scores[pos[a + 1]]:
                raise AssertionError(f"layer {layer}: twins {g} scored differently")
    if n:
        worst = min(oscore[i] for i in ids)
        chosen = set(ids)
        for s, i in ranked:
            if i not in chosen and s > worst + 2 * tol:
                raise AssertionError(f"layer {layer}: id {i} (oracle {s:.7g}) left out, but "
                                     f"chosen ids score down to {worst:.7g}")
    return ids


def bound_q_k(s, q, docs, layer, ids):
    if q is None or not ids:
        return 1.0
    qn = float(np.sqrt((q.astype(np.float64) ** 2).sum(-1)).max())
    kn = max(float(np.sqrt((docs[i].k[layer].astype(np.float64) ** 2).sum(-1)).max())
             for i in ids)
    return qn * kn


def load_out(out, name):
    if not name.endswith(".npy"):
        raise AssertionError(f"probe could not save a tensor: {name}")
    return np.load(os.path.join(out, name))


def check_attention(orc, s, docs, layer, ids, q, gl, out, out_dtype, scale, qk):
    od = out_dtype or O.F32
    want_out, want_lse = orc.attend_layer(s, docs, layer, ids, q, scale)
    got_out = O.decode(od, load_out(out, gl["out"]))
    got_lse = load_out(out, gl["lse"]).astype(np.float64)
    T, Hq, D = q.shape
    if got_out.shape != (T, Hq, D) or got_lse.shape != (T, Hq):
        raise AssertionError(f"layer {layer}: out {got_out.shape} lse {got_lse.shape}")
    if not ids:
        if not (np.all(np.isneginf(got_lse)) and np.all(got_out == 0)):
            raise AssertionError(f"layer {layer}: no document selected but lse/out not -inf/0")
        return
    sc = scale or 1.0 / math.sqrt(D)
    lse_tol = 1e-4 * (1.0 + sc * qk) + 1e-5 * np.abs(want_lse)
    if not np.all(np.abs(got_lse - want_lse) <= lse_tol):
        i = np.unravel_index(np.argmax(np.abs(got_lse - want_lse) - lse_tol), want_lse.shape)
        raise AssertionError(f"layer {layer}: lse{i} {got_lse[i]:.7g}, want {want_lse[i]:.7g}")
    vmax = max(float(np.abs(docs[i].v[layer]).max()) for i in ids)
    otol = OUT_TOL[od] * max(vmax, 1e-30) * 2 + 1e-6
    err = np.abs(got_out.astype(np.float64) - want_out)
    if not np.all(err <= otol):
        i = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(f"layer {layer}: out{i} {got_out[i]:.7g}, want {want_out[i]:.7g} "
                             f"(tol {otol:.3g}, {od})")


def check_stored(out, name, want, dtype, what, d):
    if name is None:
        raise AssertionError(f"{what}: missing")
    arr = load_out(out, name)
    want_np = {O.F32: np.dtype("<f4"), O.F16: np.dtype("<f2"), O.BF16: np.dtype("<u2")}[dtype]
    if arr.dtype != want_np:
        raise AssertionError(f"{what}: dtype {arr.dtype}, want {want_np} ({DT_NAMES[dtype]})")
    got = O.decode(dtype, arr)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape}, want {want.shape}")
    # Pooled writes are rounded once: exact. Raw writes are pooled in float32, where
    # the summation order may differ: one ulp of the stored dtype.
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    tol = STORE_ULP[dtype] * np.abs(want.astype(np.float64)) * 1.01 + 1e-30
    if not np.all((err == 0) | (err <= tol)):
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(f"{what}: element {i} {got[i]!r}, want {want[i]!r}")


def check_info(got, d: O.Doc, s: O.Schema):
    want = {"version": d.version, "tokens": d.tokens, "chunks": d.chunks,
            "created_seq": d.created_seq, "updated_seq": d.updated_seq,
            "text_bytes": len(d.text), "metadata_bytes": len(d.metadata)}
    for k, v in want.items():
        if int(got[k]) != v:
            raise AssertionError(f"doc {d.id}: {k} {got[k]}, want {v}")
    now_ms = time.time() * 1000
    if not now_ms - 3_600_000 < float(got["updated_unix_ms"]) <= now_ms + 60_000:
        raise AssertionError(f"doc {d.id}: updated_unix_ms {got['updated_unix_ms']} is not recent")


# ==== schemas ==========================================================================

def schema(**kw) -> O.Schema:
    base = dict(layers=[0, 5], kv_heads=2, query_heads=4, head_dim=8, chunk_tokens=3)
    base.update(kw)
    return O.Schema(**base)


# Together these cover every option value at least once, every dtype, I8
# routing, separate and shared router keys, tiny and odd sizes.
SCHEMAS = [
    ("cos_bf16", schema()),
    ("dot_f32_max", schema(kv_dtype=O.F32, routing_dtype=O.F32, similarity=O.DOT,
                           head_reduce=O.HEAD_MAX, query_reduce=O.QUERY_MEAN,
                           chunk_reduce=O.CHUNK_MEAN)),
    ("sep_f16_last", schema(layers=[7], kv_dtype=O.F16, routing_dtype=O.F16,
                            separate_router_keys=True, query_reduce=O.QUERY_LAST,
                            head_dim=5, chunk_tokens=5)),
    ("i8_sep", schema(layers=[1, 2, 30], kv_dtype=O.BF16, routing_dtype=O.I8,
                      separate_router_keys=True, kv_heads=1, query_heads=3, head_dim=3,
                      chunk_tokens=1, chunk_reduce=O.CHUNK_MEAN)),
    ("i8_shared_dot", schema(kv_dtype=O.F32, routing_dtype=O.I8, similarity=O.DOT,
                             head_reduce=O.HEAD_MAX, query_reduce=O.QUERY_LAST, kv_heads=4,
                             query_heads=8, head_dim=16, chunk_tokens=4)),
    ("mixed_f16kv_bf16r", schema(kv_dtype=O.F16, routing_dtype=O.BF16, query_reduce=O.QUERY_MEAN,
                                 head_reduce=O.HEAD_MAX, kv_heads=1, query_heads=1, head_dim=1,
                                 chunk_tokens=2)),
    ("f32kv_f16r_dot_sep", schema(kv_dtype=O.F32, routing_dtype=O.F16, similarity=O.DOT,
                                  separate_router_keys=True, chunk_reduce=O.CHUNK_MEAN,
                                  chunk_tokens=64, head_dim=32, default_top_k=5)),
    ("paper_like", schema(layers=[3, 9], kv_heads=8, query_heads=32, head_dim=128,
                          chunk_tokens=64, model="EverMind-AI/MSA-4B@test")),
]


# ==== tests ============================================================================

class EngineTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.access(PROBE, os.X_OK):
            raise unittest.SkipTest(f"{PROBE} not built")

    def scenario(self, name, seed=0):
        sc = Scenario(self, name, seed + SEED)
        self.addCleanup(sc.cleanup)
        return sc

    # ---- random stores over every schema, with reopen and backup ----

    def random_store(self, idx, name, s: O.Schema):
        sc = self.scenario(name, seed=1000 + idx)
        coll = "c_" + name
        model = s.model
        sc.create(coll, s)
        ids = sc.prng.sample(range(1, 10 ** 6), 28) + [(1 << 63) - 1]
        # inserts, a few in multi-op requests
        i = 0
        while i < len(ids):
            n = sc.prng.choice([1, 1, 1, 3])
            sc.write(coll, [sc.make_put(coll, d) for d in ids[i:i + n]], expect="OK")
            i += n
        # exact twins: same tensors, different ids -> equal scores, smaller id first
        c = sc.store.colls[coll]
        src = c.docs[ids[0]]
        twin_vals = {l: src.k[l] for l in s.layers}
        sc.twins.append([ids[0], ids[0] + 1_000_000, ids[0] + 2_000_000])
        for tid in sc.twins[-1]:
            j, op = sc.make_put(coll, tid, tokens=src.tokens, raw=False, dtype=O.F32,
                                values=twin_vals)
            if s.separate_router_keys:   # same router keys too
                for lj, pl in zip(j["put"]["layers"], op.layers):
                    f, enc = sc.tensor(O.F32, src.r[pl.layer])
                    lj["router_k"], pl.router_k, pl.r_dtype = f, enc, O.F32
            sc.write(coll, [(j, op)], expect="OK")
        # updates and deletes
        for d in ids[1:6]:
            j, op = sc.make_put(coll, d)
            op.expect_version = 1
            sc.write(coll, [(j, op)], expect="OK")
        sc.write(coll, [sc.delete_op(ids[6]), sc.delete_op(ids[7], expect_version=1)],
                 expect="OK")
        sc.write(coll, [sc.make_put(coll, ids[6])], expect="OK")   # re-insert: version 1
        live = sorted(c.docs)
        # reads
        def reads():
            for t in range(5):
                top_k = sc.prng.choice([0, 1, 3, len(live) + 5])
                excl = sc.prng.sample(live, sc.prng.randint(0, 4))
                sc.route(coll, top_k=top_k, exclude=excl, T=sc.prng.choice([1, 2, 4]))
            sc.attend(coll, top_k=4, out_dtype=sc.prng.choice([0, O.F16, O.BF16]))
            sc.attend(coll, doc_ids=live[:3], scale_attn=0.3)
            sc.attend(coll, top_k=2, exclude=live, T=2)       # nothing selected
            sc.route(coll, top_k=1024, layers=s.layers[:1])   # a subset of layers
            sc.get(coll, live[:4] + [x for x in ids[1:2] if x not in live[:4]])
            sc.get(coll, live[-2:], layers=s.layers[-1:])
            sc.get(coll, live[2:5], with_tensors=False, with_text=False)
            sc.get(coll, live[5:7], with_tensors=False, with_metadata=False)
            sc.list(coll)
            sc.list(coll, after_id=live[3], limit=5)
            sc.describe(coll)
            sc.stats_and_verify()
        reads()
        if model:
            sc.route(coll, model=model, top_k=2)
        sc.add({"op": "backup", "name": "bk1"}, "backup", Scenario.expect_code("OK"))
        sc.run()
        # reopen: same answers
        sc.reopen()
        reads()
        sc.run()
        # the backup opens as a fresh data dir with the same answers
        bdir = backup_as_data_dir(sc.backup_dir, "bk1", sc.dir)
        reads()
        sc.run(data_dir=bdir)

    def test_random_stores(self):
        for idx, (name, s) in enumerate(SCHEMAS):
            with self.subTest(schema=name):
                self.random_store(idx, name, s)

    # ---- versions, CAS, multi-op requests ----

    def test_versions_and_cas(self):
        sc = self.scenario("cas", seed=7)
        s = schema(kv_dtype=O.F32, routing_dtype=O.F32, model="enc@1")
        sc.create("c", s)
        sc.write("c", [sc.make_put("c", 1), sc.make_put("c", 2)], expect="OK")
        sc.seq_check()
        # expect_version mismatch -> EPRECOND, nothing written (op 0 would be fine alone)
        j, op = sc.make_put("c", 2)
        op.expect_version = 5
        sc.write("c", [sc.make_put("c", 3), (j, op)], expect="EPRECOND")
        sc.seq_check()
        # expect_version on a missing id
        j, op = sc.make_put("c", 44)
        op.expect_version = 1
        sc.write("c", [(j, op)], expect="EPRECOND")
        # expect_absent on an existing id -> EEXIST, nothing written
        j, op = sc.make_put("c", 1)
        op.expect_absent = True
        sc.write("c", [sc.make_put("c", 4), (j, op)], expect="EEXIST")
        sc.seq_check()
        # expect_absent on a new id, expect_version right
        j, op = sc.make_put("c", 5)
        op.expect_absent = True
        j2, op2 = sc.make_put("c", 2)
        op2.expect_version = 1
        sc.write("c", [(j, op), (j2, op2)], expect="OK")
        # delete of a missing id -> ENOTFOUND, nothing written
        sc.write("c", [sc.make_put("c", 6), sc.delete_op(99)], expect="ENOTFOUND")
        # delete with a wrong expect_version
        sc.write("c", [sc.delete_op(1, expect_version=2)], expect="EPRECOND")
        # same id twice in one request: later sees earlier
        sc.write("c", [sc.make_put("c", 7), sc.make_put("c", 7)], expect="OK")       # 1, 2
        sc.write("c", [sc.make_put("c", 8), sc.delete_op(8)], expect="OK")           # 1, 0
        sc.write("c", [sc.delete_op(7), sc.make_put("c", 7)], expect="OK")           # 0, 1
        j, op = sc.make_put("c", 2)
        op.expect_version = 2
        j2, op2 = sc.make_put("c", 2)
        op2.expect_version = 3
        sc.write("c", [(j, op), (j2, op2)], expect="OK")                             # 3, 4
        # model: equal is fine, other -> EPRECOND, empty = no check
        sc.write("c", [sc.make_put("c", 9)], model="enc@1", expect="OK")
        sc.write("c", [sc.make_put("c", 10)], model="enc@2", expect="EPRECOND", field="")
        sc.route("c", model="enc@1")
        sc.call({"op": "route", "collection": "c", "model": "other",
                 "layers": [{"layer": 0, "routing_q": sc.query(O.F32, 1, 4, 8)[0]}]}, "EPRECOND")
        q = sc.query(O.F32, 1, 4, 8)[0]
        sc.call({"op": "attend", "collection": "c", "model": "other",
                 "layers": [{"layer": 0, "routing_q": q, "q": q}]}, "EPRECOND")
        sc.seq_check()
        sc.list("c")
        sc.get("c", [1, 2, 5, 7, 9])
        sc.describe("c")
        sc.stats_and_verify()
        # min_seq: reached -> OK; in the future -> DEADLINE_EXCEEDED (probe waits 300 ms)
        sc.route("c", min_seq=sc.store.seq)
        sc.call({"op": "route", "collection": "c", "min_seq": sc.store.seq + 5,
                 "layers": [{"layer": 0, "routing_q": q}]}, "ETIMEOUT")
        sc.run()

    # ---- collections ----

    def test_collections(self):
        sc = self.scenario("colls", seed=11)
        sc.create("a", schema())
        sc.create("a", schema(), expect="EEXIST")
        sc.create("b.x-y_Z9", schema(layers=[3], kv_dtype=O.F32))
        for bad in ["", "a/b", "a b", "x" * 65, "\u00e9t\u00e9", "..//"]:
            sc.create(bad, schema(), expect="EINVAL", field="")
        sc.create("y" * 64, schema())
        sc.write("a", [sc.make_put("a", 1), sc.make_put("a", 2)], expect="OK")
        sc.list_collections()
        sc.describe("a")
        sc.drop("a")
        sc.drop("a")                                      # ENOTFOUND
        sc.describe("a")                                  # ENOTFOUND
        sc.call({"op": "list", "collection": "a"}, "ENOTFOUND")
        sc.call({"op": "get", "collection": "a", "ids": ["1"]}, "ENOTFOUND")
        q = sc.query(O.F32, 1, 4, 8)[0]
        sc.call({"op": "route", "collection": "a", "layers": [{"layer": 0, "routing_q": q}]},
                "ENOTFOUND")
        sc.call({"op": "write", "collection": "zz", "ops": [{"delete": 1}]}, "ENOTFOUND")
        # a malformed collection name is INVALID_ARGUMENT on every call (SEMANTICS table)
        for bad_name in ("a/b", ""):
            sc.call({"op": "write", "collection": bad_name, "ops": [{"delete": 1}]}, "EINVAL")
            sc.call({"op": "route", "collection": bad_name,
                     "layers": [{"layer": 0, "routing_q": q}]}, "EINVAL")
            sc.call({"op": "get", "collection": bad_name, "ids": ["1"]}, "EINVAL")
            sc.call({"op": "list", "collection": bad_name}, "EINVAL")
            sc.call({"op": "describe", "name": bad_name}, "EINVAL")
            sc.call({"op": "drop", "name": bad_name}, "EINVAL")
        # re-create under the same name: empty, fresh created_seq
        sc.create("a", schema(kv_dtype=O.F16))
        sc.describe("a")
        sc.list("a")
        sc.list_collections()
        sc.stats_and_verify()
        sc.seq_check()
        sc.run()
        sc.reopen()
        sc.list_collections()
        sc.describe("a")
        sc.seq_check()
        sc.run()

    def test_bad_schemas(self):
        sc = self.scenario("schemas", seed=12)
        bad = [
            ("layers", dict(layers=[])), ("layers", dict(layers=[3, 3])),
            ("layers", dict(layers=[4, 2])), ("layers", dict(layers=list(range(257)))),
            ("kv_heads", dict(kv_heads=0)), ("kv_heads", dict(kv_heads=65, query_heads=130)),
            ("query_heads", dict(query_heads=5)), ("query_heads", dict(query_heads=1)),
            ("query_heads", dict(query_heads=258)), ("head_dim", dict(head_dim=0)),
            ("head_dim", dict(head_dim=257)), ("chunk_tokens", dict(chunk_tokens=0)),
            ("chunk_tokens", dict(chunk_tokens=4097)), ("kv_dtype", dict(kv_dtype=O.I8)),
            ("kv_dtype", dict(kv_dtype=9)), ("routing_dtype", dict(routing_dtype=7)),
            ("similarity", dict(similarity=2)), ("head_reduce", dict(head_reduce=2)),
            ("query_reduce", dict(query_reduce=3)), ("chunk_reduce", dict(chunk_reduce=5)),
            ("default_top_k", dict(default_top_k=1025)), ("model", dict(model="m" * 256)),
        ]
        for i, (fld, kw) in enumerate(bad):
            sc.create(f"s{i}", schema(**kw), expect="EINVAL", field=fld)
        # the limits themselves are fine
        sc.create("ok1", schema(layers=list(range(0, 512, 2)), kv_heads=64, query_heads=256,
                                head_dim=256, chunk_tokens=4096, default_top_k=1024,
                                model="m" * 255))
        sc.create("ok2", schema(layers=[0], kv_heads=1, query_heads=1, head_dim=1,
                                chunk_tokens=1, default_top_k=1))
        sc.seq_check()
        sc.list_collections()
        sc.run()

    # ---- bad input: every row of the validation table, nothing written ----

    def test_bad_writes(self):
        sc = self.scenario("badw", seed=13)
        s = schema(layers=[1, 4], kv_dtype=O.BF16, routing_dtype=O.F16,
                   separate_router_keys=True, chunk_tokens=4)
        sc.create("c", s)
        sc.create("n", schema(layers=[2]))                 # shared router keys
        sc.write("c", [sc.make_put("c", 1), sc.make_put("c", 2)], expect="OK")
        sc.write("n", [sc.make_put("n", 1)], expect="OK")
        H, D = 2, 8

        def put(doc_id=10, tokens=6, raw=False, coll="c"):
            return sc.make_put(coll, doc_id, tokens=tokens, raw=raw)

        def bad(mutate, field, code="EINVAL", coll="c", lead_ok=True, **kw):
            j, op = put(coll=coll, **kw)
            mutate(j["put"], op)
            items = ([put(doc_id=20, coll=coll)] if lead_ok else []) + [(j, op)]
            sc.write(coll, items, expect=code, field=field)
            sc.seq_check()

        def retensor(arr_dtype, shape=None, values=None):
            x = values if values is not None else sc.rng.standard_normal(shape).astype(np.float32)
            return sc.tensor(arr_dtype, x)

        def set_layer_tensor(jp, op, li, name, f, enc, dt):
            # li indexes the request's (shuffled) layer list
            jp["layers"][li][name] = f
            setattr(op.layers[li], name, enc)
            setattr(op.layers[li], {"k": "k_dtype", "v": "v_dtype", "router_k": "r_dtype"}[name],
                    dt)

        # wrong shape (D), wrong rows, wrong H
        f, e = retensor(O.F32, (2, H, D + 1))
        bad(lambda jp, op: set_layer_tensor(jp, op, 0, "k", f, e, O.F32), "ops[1].put.layers[0].k")
        f2, e2 = retensor(O.F32, (3, H, D))
        bad(lambda jp, op: set_layer_tensor(jp, op, 1, "v", f2, e2, O.F32),
            "ops[1].put.layers[1].v")
        f3, e3 = retensor(O.F32, (2, H + 1, D))
        bad(lambda jp, op: set_layer_tensor(jp, op, 0, "router_k", f3, e3, O.F32),
            "ops[1].put.layers[0].router_k")
        # raw write with pooled rows
        f4, e4 = retensor(O.F32, (2, H, D))
        bad(lambda jp, op: set_layer_tensor(jp, op, 0, "k", f4, e4, O.F32),
            "ops[1].put.layers[0].k", raw=True)
        # rank 2
        f5 = sc.save(sc.rng.standard_normal((2, H * D)).astype(np.float32))

        def rank2(jp, op):
            jp["layers"][0]["k"] = f5
            op.layers[0].k = np.zeros((2, H * D), np.float32)
        bad(rank2, "ops[1].put.layers[0].k")
        # I8 dtype, unspecified dtype label, unknown dtype number
        f6, e6 = sc.tensor(O.I8, np.ones((2, H, D)))

        def i8(jp, op):
            jp["layers"][1]["v"] = f6
            op.layers[1].v, op.layers[1].v_dtype = e6, O.I8
        bad(i8, "ops[1].put.layers[1].v")

        def relabel(label):
            def m(jp, op):
                jp["layers"][0]["k"] = {"npy": jp["layers"][0]["k"], "dtype": label}
                op.layers[0].k_dtype = label if isinstance(label, int) else O.DTYPE_BY_NAME[label]
            return m
        bad(relabel("DTYPE_UNSPECIFIED"), "ops[1].put.layers[0].k")
        bad(relabel(9), "ops[1].put.layers[0].k")

        # byte length: 2 bytes short, 4 bytes long
        def nbytes(trunc=0, extra=0):
            def m(jp, op):
                jp["layers"][1]["router_k"] = {"npy": jp["layers"][1]["router_k"],
                                               "truncate": trunc, "extra": extra}
                op.layers[1].r_dtype = 99     # the oracle just needs to see a fault here
            return m
        bad(nbytes(trunc=2), "ops[1].put.layers[1].router_k")
        bad(nbytes(extra=4), "ops[1].put.layers[1].router_k")

        # NaN / Inf in each kind of tensor and dtype
        for name, dt, val in (("k", O.F32, np.nan), ("v", O.BF16, np.inf),
                              ("router_k", O.F16, -np.inf),
                              ("k", O.F16, 1e6)):          # 1e6 overflows to Inf in F16
            x = sc.rng.standard_normal((2, H, D)).astype(np.float32)
            x[1, 1, 3] = val
            fx, ex = sc.tensor(dt, x)
            bad(lambda jp, op, fx=fx, ex=ex, name=name, dt=dt:
                set_layer_tensor(jp, op, 1, name, fx, ex, dt), f"ops[1].put.layers[1].{name}")

        # layer not in the schema, duplicate layer, missing layer
        def layer_not_in(jp, op):
            jp["layers"][1]["layer"] = 3
            op.layers[1].layer = 3
        bad(layer_not_in, "ops[1].put.layers[1]")

        def dup_layer(jp, op):
            jp["layers"][1]["layer"] = jp["layers"][0]["layer"]
            op.layers[1].layer = op.layers[0].layer
        bad(dup_layer, "ops[1].put.layers[1]")

        def missing_layer(jp, op):
            del jp["layers"][1]
            del op.layers[1]
        bad(missing_layer, "ops[1].put.layers")

        # router_k missing with separate keys; router_k given without
        def no_router(jp, op):
            del jp["layers"][0]["router_k"]
            op.layers[0].router_k = None
        bad(no_router, "ops[1].put.layers[0].router_k")

        def extra_router(jp, op):
            jp["layers"][0]["router_k"] = jp["layers"][0]["k"]
            op.layers[0].router_k = op.layers[0].k
        bad(extra_router, "ops[1].put.layers[0].router_k", coll="n")

        # ids and tokens
        def set_id(v):
            def m(jp, op):
                jp["id"] = str(v)
                op.id = v
            return m
        bad(set_id(0), "ops[1].put.id")
        bad(set_id(1 << 63), "ops[1].put.id")
        bad(set_id((1 << 64) - 1), "ops[1].put.id")

        def tokens0(jp, op):
            jp["tokens"] = 0
            op.tokens = 0
        bad(tokens0, "ops[1].put.tokens")
        # delete of id 0 / 2^63, an op with nothing set
        sc.write("c", [put(20), sc.delete_op(0)], expect="EINVAL", field="ops[1]")
        sc.write("c", [sc.delete_op(1 << 63)], expect="EINVAL", field="ops[0]")
        sc.call({"op": "write", "collection": "c", "ops": [{"unset": True}]}, "EINVAL", "ops[0]")
        sc.seq_check()
        # a bad op after several good ones, all in one request
        j, op = put(30)
        j["put"]["tokens"] = 0
        op.tokens = 0
        sc.write("c", [put(21), put(22), sc.delete_op(1), (j, op)], expect="EINVAL",
                 field="ops[3].put.tokens")
        # unknown collection
        sc.call({"op": "write", "collection": "nope", "ops": [{"delete": 1}]}, "ENOTFOUND")
        # nothing of the above was written
        sc.seq_check()
        sc.describe("c")
        sc.list("c")
        sc.get("c", [1, 2])
        sc.stats_and_verify()
        sc.run()

    def test_bad_reads(self):
        sc = self.scenario("badr", seed=14)
        s = schema(layers=[1, 4], kv_dtype=O.F32, routing_dtype=O.BF16, chunk_tokens=2)
        sc.create("c", s)
        sc.write("c", [sc.make_put("c", 1), sc.make_put("c", 2)], expect="OK")
        q = sc.query(O.F32, 2, 4, 8)[0]
        qbad_h = sc.query(O.F32, 2, 2, 8)[0]
        qbad_d = sc.query(O.F32, 2, 4, 7)[0]
        x = sc.rng.standard_normal((2, 4, 8)).astype(np.float32)
        x[0, 2, 1] = np.nan
        qnan = sc.tensor(O.F32, x)[0]
        qi8 = sc.tensor(O.I8, np.ones((2, 4, 8)))[0]
        q0 = sc.save(np.zeros((0, 4, 8), np.float32))

        def R(**kw):
            j = {"op": "route", "collection": "c", "layers": [{"layer": 1, "routing_q": q}]}
            j.update(kw)
            return j

        sc.call(R(top_k=1025), "EINVAL", "top_k")
        sc.call(R(layers=[{"layer": 2, "routing_q": q}]), "EINVAL", "layers[0]")
        sc.call(R(layers=[{"layer": 1, "routing_q": qbad_h}]), "EINVAL", "layers[0].routing_q")
        sc.call(R(layers=[{"layer": 4, "routing_q": q}, {"layer": 1, "routing_q": qbad_d}]),
                "EINVAL", "layers[1].routing_q")
        sc.call(R(layers=[{"layer": 1, "routing_q": qnan}]), "EINVAL", "layers[0].routing_q")
        sc.call(R(layers=[{"layer": 1, "routing_q": qi8}]), "EINVAL", "layers[0].routing_q")
        sc.call(R(layers=[{"layer": 1, "routing_q": q0}]), "EINVAL", "layers[0].routing_q")
        sc.call(R(layers=[{"layer": 1, "routing_q": {"npy": q, "truncate": 4}}]), "EINVAL",
                "layers[0].routing_q")
        sc.call(R(layers=[{"layer": 1}]), "EINVAL", "layers[0].routing_q")
        sc.call(R(collection="nope"), "ENOTFOUND")
        sc.call(R(top_k=1024), "OK")

        def A(**kw):
            j = {"op": "attend", "collection": "c",
                 "layers": [{"layer": 1, "routing_q": q, "q": q}]}
            j.update(kw)
            return j
        sc.call(A(layers=[{"layer": 1, "routing_q": q}]), "EINVAL", "layers[0].q")
        sc.call(A(layers=[{"layer": 1, "routing_q": q, "q": qbad_h}]), "EINVAL", "layers[0].q")
        sc.call(A(layers=[{"layer": 1, "routing_q": q, "q": qnan}]), "EINVAL", "layers[0].q")
        sc.call(A(out_dtype="I8"), "EINVAL", "out_dtype")
        sc.call(A(out_dtype=7), "EINVAL", "out_dtype")
        sc.call(A(top_k=2000), "EINVAL", "top_k")
        sc.call(A(doc_ids=["1", "3"]), "ENOTFOUND")
        sc.call(A(doc_ids=["1", "2"]), "OK")
        sc.call(A(collection="nope"), "ENOTFOUND")
        sc.call({"op": "get", "collection": "c", "ids": ["1", "5"]}, "ENOTFOUND")
        sc.call({"op": "get", "collection": "nope", "ids": ["1"]}, "ENOTFOUND")
        sc.call({"op": "backup", "name": "../x"}, "EINVAL")
        sc.call({"op": "backup", "name": "a/b"}, "EINVAL")
        sc.seq_check()
        sc.stats_and_verify()
        sc.run()

    # ---- pooling edge cases: P not dividing N, P = 1, N < P, T = 1 ----

    def test_pooling_shapes(self):
        sc = self.scenario("pool", seed=15)
        cases = [("p5", schema(layers=[0], chunk_tokens=5, kv_dtype=O.F32, routing_dtype=O.F32)),
                 ("p1", schema(layers=[0], chunk_tokens=1, kv_dtype=O.BF16)),
                 ("p7", schema(layers=[0, 1], chunk_tokens=7, kv_dtype=O.F16,
                               separate_router_keys=True, routing_dtype=O.I8))]
        for name, s in cases:
            sc.create(name, s)
            P = s.chunk_tokens
            for i, N in enumerate([1, P - 1 or 1, P, P + 1, 2 * P + 3, 13]):
                sc.write(name, [sc.make_put(name, 100 + i, tokens=N, raw=True)], expect="OK")
                sc.write(name, [sc.make_put(name, 200 + i, tokens=N, raw=False)], expect="OK")
            ids = sorted(sc.store.colls[name].docs)
            sc.get(name, ids)
            sc.route(name, T=1, top_k=len(ids))
            sc.attend(name, T=1, top_k=3)
            sc.describe(name)
        sc.stats_and_verify()
        sc.run()


def backup_as_data_dir(backup_dir: str, name: str, work: str) -> str:
    """The backup may be a directory (an LMDB env) or a single data file."""
    path = os.path.join(backup_dir, name)
    if os.path.isdir(path):
        return path
    d = os.path.join(work, "restored_" + name)
    os.makedirs(d, exist_ok=True)
    shutil.copyfile(path, os.path.join(d, "data.mdb"))
    return d


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    if len(sys.argv) > 1:
        suite = unittest.TestSuite(
            t for t in _iter(suite) if any(a in t.id() for a in sys.argv[1:]))
    t0 = time.time()
    res = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(res.failures) + len(res.errors)
    skipped = len(res.skipped)
    passed = res.testsRun - failed - skipped
    print(f"test_engine.py: {time.time() - t0:.1f} s")
    if BACKEND == "cuda":
        print(f"device counters over the run: {json.dumps(GPU_TOTALS, sort_keys=True)}")
        for c in GPU_EXPECT:
            if GPU_TOTALS.get(c, 0) == 0:
                print(f"FAIL: counter {c} stayed 0: the path it counts never ran")
                failed += 1
                passed -= 1 if passed else 0
        for c in GPU_EXPECT_ZERO:
            if GPU_TOTALS.get(c, 0) != 0:
                print(f"FAIL: counter {c} is {GPU_TOTALS[c]}, want 0")
                failed += 1
                passed -= 1 if passed else 0
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    if res.testsRun and skipped == res.testsRun:
        sys.exit(77)
    sys.exit(1 if failed else 0)


def _iter(s):
    for t in s:
        if isinstance(t, unittest.TestSuite):
            yield from _iter(t)
        else:
            yield t


if __name__ == "__main__":
    main()
