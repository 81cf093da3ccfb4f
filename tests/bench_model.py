"""The cost of msad as an MSA model's memory (ops/bench-model).

For each model size (``tiny``: the test model; ``small``: 8 layers, hidden 512,
Hq 8 / H 4, D 64, P 16, 4 memory layers), on CPU in float32:
  * encode throughput: tokens/s of the model's document encoding alone, and of
    ingest (encode + Write to msad, durable);
  * prefill and per-generated-token time with an in-process memory
    (tests/msa_ref.py FastInProcessMemory: router keys in one torch matrix, one matmul,
    scatter-max, topk; the floor: no memory traffic at all), fetch mode and attend mode,
    and their ratio to in-process;
  * bytes on the wire per memory layer: prefill (fetch: Route + Get; attend: Attend)
    and per decoded token (fetch: none, the chunks stay in the layer's cache; attend:
    one Attend with doc_ids).

usage: MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/bench_model.py [--sizes tiny,small]
Prints one JSON line per size ("bench_model: {...}") and a table.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon_util import BIN, Daemon, cpu_model  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(BIN)), "python"))
import torch  # noqa: E402

from msa_model import MsadMemoryClient, tiny_msa_model  # noqa: E402
from msa_ref import FastInProcessMemory  # noqa: E402

SIZES = {
    "tiny": dict(),
    "small": dict(layers=8, memory_layers=(4, 5, 6, 7), hidden=512, heads=8, kv_heads=4,
                  head_dim=64, chunk_tokens=16, top_k=8),
}


def corpus(n, words=48):
    vocab = ("ledger vault keeper harbour lantern amber cobalt raven quartz tundra willow cedar "
             "opens closes north south spring autumn merchant fleet pier festival lighthouse").split()
    docs = {}
    for i in range(n):
        ws = [vocab[(i * 7 + j * 13 + j * j) % len(vocab)] for j in range(words)]
        docs[i + 1] = "Note %d. " % i + " ".join(ws) + "."
    return docs


def bench(size, d, n_docs, new_tokens, reps):
    m = tiny_msa_model(seed=0, **SIZES[size])
    docs = corpus(n_docs)
    ntok = sum(len(m.tokenizer.encode(t)) for t in docs.values())
    t = time.perf_counter()
    for text in docs.values():
        m.encode_document(text)
    enc_s = time.perf_counter() - t
    ref = FastInProcessMemory(m)
    for i, text in docs.items():
        ref.put(i, text)
    coll = "bench-" + size
    fetch = MsadMemoryClient(d.addr, coll, m, mode="fetch").create()
    t = time.perf_counter()
    items = list(docs.items())
    for b in range(0, len(items), 16):       # 16 documents per Write (one commit)
        fetch.add(dict(items[b:b + 16]))
    ingest_s = time.perf_counter() - t
    attend = MsadMemoryClient(fetch.client, coll, m, mode="attend").open()
    q = "Who keeps the cobalt ledger of the north harbour?"
    L = len(m.memory_layers)
    res = {"size": size, "cpu": cpu_model(), "threads": torch.get_num_threads(),
           "params_m": round(sum(p.numel() for p in m.lm.parameters()) / 1e6, 2),
           "docs": n_docs, "doc_tokens": ntok, "memory_layers": L, "top_k": m.settings.top_k,
           "chunk_tokens": m.settings.chunk_tokens,
           "encode_tok_s": round(ntok / enc_s), "ingest_tok_s": round(ntok / ingest_s),
           # 2 FLOP per parameter per token (matmuls; attention over a document excluded)
           "encode_gflop_s": round(2 * sum(p.numel() for p in m.lm.parameters()) * ntok / enc_s / 1e9, 1)}
    mems = (("inproc", ref), ("fetch", fetch), ("attend", attend))
    times = {n: ([], []) for n, _ in mems}
    wire = {}
    for name, mem in mems:
        m.generate(q, mem, max_new_tokens=2)          # warm-up
    # Modes take turns in every repetition, so drift (other load, frequency) hits all
    # three alike; medians over the repetitions.
    for _ in range(reps):
        for name, mem in mems:
            w0 = dict(getattr(mem, "wire", {"sent": 0, "received": 0}))
            t = time.perf_counter()
            m.generate(q, mem, max_new_tokens=1)
            t1 = time.perf_counter()
            w1 = dict(getattr(mem, "wire", {"sent": 0, "received": 0}))
            m.generate(q, mem, max_new_tokens=new_tokens)
            t2 = time.perf_counter()
            w2 = dict(getattr(mem, "wire", {"sent": 0, "received": 0}))
            times[name][0].append(t1 - t)
            times[name][1].append(((t2 - t1) - (t1 - t)) / (new_tokens - 1))
            pb = w1["sent"] - w0["sent"] + w1["received"] - w0["received"]
            fb = w2["sent"] - w1["sent"] + w2["received"] - w1["received"]
            wire[name] = (pb / L, (fb - pb) / (new_tokens - 1) / L)
    for name, _mem in mems:
        res[name + "_prefill_ms"] = round(statistics.median(times[name][0]) * 1e3, 2)
        res[name + "_token_ms"] = round(statistics.median(times[name][1]) * 1e3, 3)
        if name != "inproc":
            res[name + "_prefill_bytes_per_layer"] = round(wire[name][0])
            res[name + "_token_bytes_per_layer"] = round(wire[name][1])
    for name in ("fetch", "attend"):
        res[name + "_prefill_ratio"] = round(res[name + "_prefill_ms"] / res["inproc_prefill_ms"], 2)
        res[name + "_token_ratio"] = round(res[name + "_token_ms"] / res["inproc_token_ms"], 2)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rows = []
    with Daemon() as d:
        for size in a.sizes.split(","):
            r = bench(size, d, a.docs, a.new_tokens, a.reps)
            print("bench_model: " + json.dumps(r), flush=True)
            rows.append(r)
    print("\nCPU: %s, torch threads %d, msad on loopback (durable writes)" % (rows[0]["cpu"], rows[0]["threads"]))
    print("| model | encode tok/s | ingest tok/s | prefill ms in-proc / fetch / attend | "
          "per token ms in-proc / fetch / attend | ratio fetch, attend (prefill; token) | "
          "wire B/layer prefill fetch / attend | wire B/layer/token fetch / attend |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s (%.2fM params, %d docs) | %d | %d | %.1f / %.1f / %.1f | %.2f / %.2f / %.2f | "
              "%.2fx, %.2fx; %.2fx, %.2fx | %d / %d | %d / %d |" % (
                  r["size"], r["params_m"], r["docs"], r["encode_tok_s"], r["ingest_tok_s"],
                  r["inproc_prefill_ms"], r["fetch_prefill_ms"], r["attend_prefill_ms"],
                  r["inproc_token_ms"], r["fetch_token_ms"], r["attend_token_ms"],
                  r["fetch_prefill_ratio"], r["attend_prefill_ratio"], r["fetch_token_ratio"],
                  r["attend_token_ratio"], r["fetch_prefill_bytes_per_layer"],
                  r["attend_prefill_bytes_per_layer"], r["fetch_token_bytes_per_layer"],
                  r["attend_token_bytes_per_layer"]))


if __name__ == "__main__":
    main()
