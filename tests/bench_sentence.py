"""Encode throughput of the SentenceEncoder's two paths (ONNX Runtime vs
sentence-transformers/torch) on this CPU, on the same passages.

    MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/bench_sentence.py [--n 512] [--reps 3]

Passages: Debian fortunes (the eval-memory haystack), as SentenceEncoder.passages
cuts them (<= 128 + 64 word pieces), first --n of them (--long: fortunes joined 12
at a time first, so most passages are ~128 word pieces); batch 32. Each path is
warmed up once, then timed --reps times (best and median passages/s). Also the
agreement of the two paths on these passages (max |difference|, min cosine).
"""
import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_memory as EV  # noqa: E402
from daemon_util import cpu_model  # noqa: E402

EV.setup_paths()
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from msa_memory.sentence import SentenceEncoder  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--long", action="store_true",
                    help="full-length passages: fortunes joined into long documents first")
    a = ap.parse_args()
    docs = EV.load_fortunes()
    if a.long:
        docs = [" ".join(docs[i:i + 12]) for i in range(0, len(docs), 12)]
    enc = {b: SentenceEncoder(backend=b, threads=a.threads) for b in ("onnx", "torch")}
    passages = []
    for d in docs:
        passages.extend(p for p, _ in enc["onnx"].passages(d))
        if len(passages) >= a.n:
            break
    passages = passages[:a.n]
    toks = sum(enc["onnx"].count_tokens(p) for p in passages)
    print("cpu: %s, %d logical CPUs, threads=%s" % (cpu_model(), os.cpu_count(),
                                                     a.threads or "runtime default"))
    print("passages: %d, %.1f word pieces each on average" % (len(passages), toks / len(passages)))
    out, wall, cpu = {}, {b: [] for b in enc}, {b: [] for b in enc}
    for b, e in enc.items():
        t = time.perf_counter()
        e.embed(passages[:32])                       # load (and, first time, export)
        print("%-5s: load %.1f s" % (b, time.perf_counter() - t))
    # Interleaved repetitions (onnx, torch, onnx, ...): on a shared machine both
    # paths then see the same background load. CPU seconds (all threads of this
    # process) are less sensitive to that load than wall time.
    for _ in range(a.reps):
        for b, e in enc.items():
            t, c = time.perf_counter(), time.process_time()
            out[b] = e.embed(passages)
            wall[b].append(time.perf_counter() - t)
            cpu[b].append(time.process_time() - c)
    for b in enc:
        print("%-5s: %.1f passages/s median wall (best %.1f, %d reps), %.1f ms CPU per passage"
              % (b, len(passages) / statistics.median(wall[b]), len(passages) / min(wall[b]),
                 a.reps, 1000 * statistics.median(cpu[b]) / len(passages)))
    d = np.abs(out["onnx"] - out["torch"]).max()
    cos = (out["onnx"] * out["torch"]).sum(axis=1).min()
    print("onnx vs torch: max |diff| %.2e, min cosine %.7f" % (d, cos))


if __name__ == "__main__":
    main()
