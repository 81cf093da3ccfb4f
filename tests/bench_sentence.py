"""Encode throughput of the SentenceEncoder's two paths (ONNX Runtime vs
sentence-transformers/torch) on this CPU, on the same passages.

    MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/bench_sentence.py [--n 512] [--reps 3]

Passages: Debian fortunes (the eval-memory haystack), as SentenceEncoder.passages
cuts them (<= 128 + 64 word pieces), first --n of them; batch 32. Each path is
warmed up once, then timed --reps times (best and median passages/s). Also the
agreement of the two paths on these passages (max |difference|, min cosine).
"""
import argparse
import os
import platform
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_memory as EV  # noqa: E402

EV.setup_paths()
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from msa_memory.sentence import SentenceEncoder  # noqa: E402


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    docs = EV.load_fortunes()
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
    out = {}
    for b, e in enc.items():
        t = time.perf_counter()
        e.embed(passages[:32])                       # load (and, first time, export)
        load = time.perf_counter() - t
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            out[b] = e.embed(passages)
            times.append(time.perf_counter() - t)
        print("%-5s: load %.1f s; %.1f passages/s best, %.1f median (%d reps)" % (
            b, load, len(passages) / min(times), len(passages) / statistics.median(times),
            a.reps))
    d = np.abs(out["onnx"] - out["torch"]).max()
    cos = (out["onnx"] * out["torch"]).sum(axis=1).min()
    print("onnx vs torch: max |diff| %.2e, min cosine %.7f" % (d, cos))


if __name__ == "__main__":
    main()
