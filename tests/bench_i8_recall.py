"""Recall of I8 (and BF16) routing keys against F32 on the CPU backend.

Three collections hold the same documents (F32 K/V, routing dtype F32, BF16 or
I8); the same queries are routed in each and recall@k of the BF16/I8 top-k
against the F32 top-k is reported, with the median Route time of each.

Keys are a mixture of 64 Gaussian clusters (documents inside a cluster are
near-ties, which is where quantisation hurts), queries are noisy copies of
random documents' keys. MSA-4B head shapes (H=8, Hq=32, D=128), P=64, 1 layer.

usage: MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/bench_i8_recall.py [DOCS] [QUERIES]
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon_util import Daemon  # noqa: E402

build = os.path.dirname(os.environ.get("MSA_BIN", os.path.join(os.path.dirname(__file__), "..", "build", "bin")))
sys.path.insert(0, os.path.join(os.path.abspath(build), "python"))
import numpy as np  # noqa: E402
from msa_client import Client  # noqa: E402

H, HQ, D, P, C, K = 8, 32, 128, 64, 8, 16


def main():
    docs = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    nq = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((64, H, D)).astype(np.float32)
    assign = rng.integers(0, 64, docs)
    keys = (centers[assign][:, None] + 0.35 * rng.standard_normal((docs, C, H, D))).astype(np.float32)
    with Daemon(args=["--sync", "nosync"]) as d:
        cl = Client(d.addr)
        for rt in ("f32", "bf16", "i8"):
            cl.create_collection(rt, layers=[0], kv_heads=H, query_heads=HQ, head_dim=D,
                                 chunk_tokens=P, kv_dtype="f32", routing_dtype=rt)
            batch = [cl.document(rt, i + 1, {0: (keys[i], keys[i])}) for i in range(docs)]
            cl.put_many(rt, batch)
        picks = rng.integers(0, docs, nq)
        recall = {"bf16": [], "i8": []}
        ms = {"f32": [], "bf16": [], "i8": []}
        for qi in picks:
            base = keys[qi][rng.integers(0, C, 8)]                    # 8 query tokens
            q = np.repeat(base, HQ // H, axis=1) + 0.5 * rng.standard_normal((8, HQ, D)).astype(np.float32)
            top = {}
            for rt in ("f32", "bf16", "i8"):
                t0 = time.perf_counter()
                top[rt] = set(cl.route(rt, {0: q.astype(np.float32)}, top_k=K)[0][0].tolist())
                ms[rt].append((time.perf_counter() - t0) * 1e3)
            for rt in ("bf16", "i8"):
                recall[rt].append(len(top[rt] & top["f32"]) / K)
        out = {"docs": docs, "rows": docs * C, "queries": nq, "k": K,
               "recall_bf16": float(np.mean(recall["bf16"])), "recall_i8": float(np.mean(recall["i8"])),
               "min_recall_i8": float(np.min(recall["i8"])),
               "route_ms_median": {rt: float(np.median(v)) for rt, v in ms.items()}}
        print(f"i8 recall@{K} vs F32: {out['recall_i8']:.4f} (min {out['min_recall_i8']:.3f}); "
              f"bf16: {out['recall_bf16']:.4f}; route ms median f32/bf16/i8: "
              + " / ".join(f"{out['route_ms_median'][rt]:.2f}" for rt in ("f32", "bf16", "i8"))
              + f" ({docs} docs, {docs * C} rows, {nq} queries of 8 tokens)")
        print("i8_recall: " + json.dumps(out))


if __name__ == "__main__":
    main()
