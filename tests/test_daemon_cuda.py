#!/usr/bin/env python3
"""test_daemon_cuda.py — msad with --backend cuda, end to end over gRPC.

A real msad process on loopback, driven with grpcio stubs generated from the
proto; answers checked against tests/oracle.py (the independent NumPy
reference). By default the daemon runs on the simulated device
(MSA_GPU_SIM=1: gpu/dev_sim.c, the device layer's contract on the host), so the
CUDA backend's host logic — shards over two devices, coalescing, paging, the
K/V cache — is exercised on machines without a GPU. MSA_DAEMON_GPU=real runs
the same against the real GPU (ops/gpu-check).

Checks: Route/Attend answers (BF16 storage, HEAD_MAX, several layers, excludes)
match the oracle; an update and a delete are seen by the next call (the device
mirrors follow the index); concurrent Routes share device passes; Stats lists
the devices and the gpu.* counters (no CPU fallback); /metrics carries the
msad_gpu_* series; bad --gpu-* flags and an unusable --backend cuda refuse to
start with a message naming the cause.
"""
import concurrent.futures
import os
import subprocess
import sys
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import (Daemon, check_stats_metrics, from_tensor, msad_path, stubs,  # noqa: E402
                         tensor)

if not os.access(msad_path(), os.X_OK):
    print("skip: %s not built" % msad_path())
    sys.exit(77)

import oracle as O  # noqa: E402

pb, pb_grpc, hpb, hpb_grpc = stubs()
REAL = os.environ.get("MSA_DAEMON_GPU") == "real"
LAYERS = [2, 5, 9]
H, HQ, D, P = 2, 8, 16, 4


def gpu_env():
    env = dict(os.environ)
    if not REAL:
        env["MSA_GPU_SIM"] = "1"
        env["MSA_GPU_SIM_DEVICES"] = "2"
    return env


class CudaDaemonTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        os.environ.update(gpu_env())
        cls.d = Daemon(args=["--backend", "cuda", "--gpu-shards", "2", "--gpu-coalesce-us", "500",
                             "--gpu-scratch-mb", "64", "--gpu-lanes", "3", "--gpu-routing-mb", "64",
                             "--gpu-cache-mb", "16"], metrics=True)
        cls.d.start()
        cls.m = cls.d.memory()
        cls.rng = np.random.default_rng(7)

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        for k in ("MSA_GPU_SIM", "MSA_GPU_SIM_DEVICES"):
            os.environ.pop(k, None)

    def write_docs(self, coll, osch, docs, ids, gen):
        ops = []
        for i in ids:
            tokens = 2 + (i * 7 + gen) % 23
            n = (tokens + P - 1) // P
            layers, kd, vd, rd = [], {}, {}, {}
            for l in LAYERS:
                k, v, r = (self.rng.standard_normal((n, H, D)).astype(np.float32) for _ in range(3))
                layers.append(pb.LayerKV(layer=l, k=tensor(k), v=tensor(v), router_k=tensor(r)))
                kd[l], vd[l] = (O.round_to(osch.kv_dtype, x) for x in (k, v))
                rd[l] = O.round_to(osch.routing_dtype, r)
            ops.append(pb.WriteOp(put=pb.Document(id=i, tokens=tokens, layers=layers)))
            docs[i] = O.Doc(id=i, version=1, tokens=tokens, chunks=n, created_seq=0,
                            updated_seq=0, text=b"", metadata=b"", k=kd, v=vd, r=rd)
        self.m.Write(pb.WriteRequest(collection=coll, ops=ops))

    def check_attend(self, coll, osch, docs, top_k, exclude):
        T = 3
        q = {l: self.rng.standard_normal((T, HQ, D)).astype(np.float32) for l in LAYERS}
        lq = [pb.LayerQuery(layer=l, routing_q=tensor(q[l]), q=tensor(q[l])) for l in LAYERS]
        a = self.m.Attend(pb.AttendRequest(collection=coll, layers=lq, top_k=top_k,
                                           exclude_ids=exclude))
        for la in a.layers:
            ranked, bound = O.Oracle().route_layer(osch, docs, la.layer, q[la.layer], top_k,
                                                   exclude=exclude)
            tol = 1e-2 * bound
            ref = {did: sc for sc, did in ranked}
            self.assertEqual(len(la.doc_ids), min(top_k, len(ranked)))
            for pos, (did, sc) in enumerate(zip(la.doc_ids, la.scores)):
                self.assertIn(did, ref, "layer %d: doc %d is not a candidate" % (la.layer, did))
                self.assertAlmostEqual(ref[did], ranked[pos][0], delta=tol)
                self.assertAlmostEqual(sc, ref[did], delta=tol)
            out, lse = O.Oracle.attend_layer(osch, docs, la.layer, list(la.doc_ids), q[la.layer])
            np.testing.assert_allclose(from_tensor(la.out), out, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(from_tensor(la.lse), lse, rtol=1e-3, atol=1e-3)

    def create(self, name, dtype, separate, similarity, head_reduce):
        """Creates the collection; returns its oracle schema."""
        kw = dict(layers=LAYERS, kv_heads=H, query_heads=HQ, head_dim=D, chunk_tokens=P,
                  kv_dtype=dtype, routing_dtype=dtype, separate_router_keys=separate,
                  similarity=similarity, head_reduce=head_reduce, query_reduce=O.QUERY_MEAN,
                  chunk_reduce=O.CHUNK_MAX)
        self.m.CreateCollection(pb.CreateCollectionRequest(name=name, schema=pb.CollectionSchema(**kw)))
        return O.Schema(**kw)

    def test_1_oracle_route_attend_update_delete(self):
        osch = self.create("g", O.BF16, True, O.DOT, O.HEAD_MAX)
        docs = {}
        self.write_docs("g", osch, docs, range(1, 41), 0)
        self.check_attend("g", osch, docs, 6, [3, 17])
        # The device mirrors follow updates and deletes (lazy sync on the next query).
        self.write_docs("g", osch, docs, [5, 6, 7, 8], 1)
        self.m.Write(pb.WriteRequest(collection="g", ops=[pb.WriteOp(delete_id=i) for i in (9, 10)]))
        for i in (9, 10):
            del docs[i]
        self.check_attend("g", osch, docs, 12, [])
        self.check_attend("g", osch, docs, 12, [])   # warm K/V cache, same answers

    def test_2_concurrent_routes_coalesce(self):
        osch = self.create("c", O.F32, False, O.COSINE, O.HEAD_MEAN)
        docs, ops = {}, []
        for i in range(1, 301):
            n = 1 + i % 5
            layers, kd, vd = [], {}, {}
            for l in LAYERS:
                k, v = (self.rng.standard_normal((n, H, D)).astype(np.float32) for _ in range(2))
                layers.append(pb.LayerKV(layer=l, k=tensor(k), v=tensor(v)))
                kd[l], vd[l] = k, v
            ops.append(pb.WriteOp(put=pb.Document(id=i, tokens=n * P, layers=layers)))
            docs[i] = O.Doc(id=i, version=1, tokens=n * P, chunks=n, created_seq=0, updated_seq=0,
                            text=b"", metadata=b"", k=kd, v=vd, r=kd)
        self.m.Write(pb.WriteRequest(collection="c", ops=ops))
        qs = [{l: self.rng.standard_normal((2, HQ, D)).astype(np.float32) for l in LAYERS}
              for _ in range(48)]
        before = self.counters()

        def one(q):
            lq = [pb.LayerQuery(layer=l, routing_q=tensor(q[l])) for l in LAYERS]
            return q, self.m.Route(pb.RouteRequest(collection="c", layers=lq, top_k=8))

        # Whether two calls meet in one pass depends on timing: on a loaded
        # machine a burst can arrive one call at a time, so up to 5 bursts.
        for _burst in range(5):
            with concurrent.futures.ThreadPoolExecutor(12) as ex:
                results = list(ex.map(one, qs))
            for q, r in results:
                for lr in r.layers:
                    ranked, bound = O.Oracle().route_layer(osch, docs, lr.layer, q[lr.layer], 8)
                    tol = 1e-4 * bound
                    for pos, (did, sc) in enumerate(zip(lr.doc_ids, lr.scores)):
                        self.assertAlmostEqual(sc, ranked[pos][0], delta=tol)
            after = self.counters()
            if after["gpu.coalesced"] > before["gpu.coalesced"]:
                break
        self.assertGreater(after["gpu.routes_device"], before["gpu.routes_device"])
        self.assertGreater(after["gpu.coalesced"], before["gpu.coalesced"],
                           "5 bursts of 48 concurrent routes never shared a device pass")

    def counters(self):
        return dict(self.m.Stats(pb.StatsRequest()).counters)

    def test_3_stats_and_metrics(self):
        s = self.m.Stats(pb.StatsRequest())
        self.assertEqual(s.backend, "cuda")
        names = [dv.name for dv in s.devices]
        self.assertEqual(names[0], "cpu")
        self.assertEqual(len(names), 3 if not REAL else len(names), names)
        if not REAL:
            self.assertIn("simulated", names[1])
        self.assertTrue(any(dv.routing_bytes > 0 for dv in s.devices[1:]), s.devices)
        self.assertTrue(any(dv.cache_bytes > 0 for dv in s.devices[1:]), s.devices)
        c = s.counters
        self.assertEqual(c["gpu.routes_fallback"], 0)
        self.assertEqual(c["gpu.attends_fallback"], 0)
        self.assertGreater(c["gpu.cache_hits"], 0)
        self.assertGreater(c["gpu.attends_device"], 0)
        text = urllib.request.urlopen("http://%s/metrics" % self.d.metrics_addr, timeout=10).read().decode()
        for series in ("msad_gpu_routes_total", "msad_gpu_cache_hits_total",
                       'msad_gpu_memory_bytes{device="0",use="routing"}'):
            self.assertIn(series, text)
        # Every Stats counter, gpu.* included (gpu.syncs, gpu.pinned_host_bytes), has a family.
        s = check_stats_metrics(self, self.m, self.d.metrics_text)
        self.assertIn("gpu.syncs", s.counters)
        self.assertIn("gpu.pinned_host_bytes", s.counters)


@unittest.skipIf(REAL, "fault injection needs the simulated device")
class CudaFaultTest(unittest.TestCase):
    """A device error mid-service (injected: every simulated kernel call after
    the 6th fails, as a sticky CUDA error would): msad switches the CUDA backend
    off and keeps answering correctly from the CPU."""

    def test_device_error_falls_back_to_cpu(self):
        env = gpu_env()
        env["MSA_GPU_SIM_FAIL_AFTER"] = "6"
        saved = dict(os.environ)
        os.environ.update(env)
        d = Daemon(args=["--backend", "cuda", "--gpu-scratch-mb", "32", "--gpu-lanes", "2",
                         "--gpu-routing-mb", "32", "--gpu-cache-mb", "8"])
        try:
            d.start()
            t = CudaDaemonTest()
            t.m, t.rng = d.memory(), np.random.default_rng(11)
            osch = t.create("f", O.F32, True, O.DOT, O.HEAD_MEAN)
            docs = {}
            t.write_docs("f", osch, docs, range(1, 31), 0)
            for _ in range(4):   # the fault hits during these; every answer stays right
                t.check_attend("f", osch, docs, 5, [2])
            c = t.m.Stats(pb.StatsRequest()).counters
            self.assertEqual(c["gpu.disabled"], 1, c)
            self.assertGreater(c["gpu.routes_fallback"] + c["gpu.attends_fallback"], 0, c)
            self.assertIn("the CUDA backend is off", d.log_tail())
        finally:
            d.stop()
            os.environ.clear()
            os.environ.update(saved)


class CudaFlagsTest(unittest.TestCase):
    def run_msad(self, args, env):
        return subprocess.run([msad_path(), "--listen", "127.0.0.1:0", "--data",
                               "/tmp/msa-cuda-flags-%d" % os.getpid()] + args,
                              env=env, capture_output=True, text=True, timeout=60)

    def test_bad_flags_name_the_flag(self):
        for args, field in ((["--gpu-shards", "0"], "--gpu-shards"),
                            (["--gpu-shards", "65"], "--gpu-shards"),
                            (["--gpu-coalesce-us", "x"], "--gpu-coalesce-us"),
                            (["--gpu-scratch-mb", "1"], "--gpu-scratch-mb")):
            p = self.run_msad(args, gpu_env())
            self.assertEqual(p.returncode, 2, p.stderr)
            self.assertIn(field, p.stderr)

    def test_cuda_without_device_refuses(self):
        if REAL:
            self.skipTest("a real GPU is there")
        env = dict(os.environ)
        env.pop("MSA_GPU_SIM", None)
        p = self.run_msad(["--backend", "cuda"], env)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("backend cuda", p.stderr)
        # ... and a budget the (simulated) device cannot hold is refused by name.
        env = gpu_env()
        env["MSA_GPU_SIM_MEM_MB"] = "2048"
        p = self.run_msad(["--backend", "cuda", "--gpu-routing-gb", "4"], env)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("routing budget", p.stderr)


if __name__ == "__main__":
    res = unittest.main(exit=False, verbosity=2).result
    failed = len(res.failures) + len(res.errors)
    print("%d passed, %d failed, %d skipped" % (res.testsRun - failed - len(res.skipped), failed,
                                                len(res.skipped)))
    sys.exit(1 if failed else 0)
