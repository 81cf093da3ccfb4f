"""The FAISS peer of bench_engine: IndexFlatIP over the same stored router
keys (normalised, float32) with the group-summed normalised queries, i.e. the
COSINE + HEAD_MEAN scoring as one inner product, T queries per layer, all
layers. Prints the median time of a full 18-layer pass and a JSON line.

usage: ~/.cache/msad/venv/bin/python tests/bench_faiss.py DUMP_DIR [REPS]
"""
import glob
import json
import os
import sys
import time

import faiss
import numpy as np


def main():
    dump = sys.argv[1]
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    faiss.omp_set_num_threads(os.cpu_count())
    indexes, queries = [], []
    for path in sorted(glob.glob(os.path.join(dump, "keys_*.npy"))):
        keys = np.load(path)
        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(keys)
        indexes.append(index)
        queries.append(np.ascontiguousarray(np.load(path.replace("keys_", "query_"))))
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for index, q in zip(indexes, queries):
            index.search(q, 16)
        times.append((time.perf_counter() - t0) * 1e3)
    times = sorted(times[1:])
    med = times[len(times) // 2]
    rows = indexes[0].ntotal
    print(f"faiss: IndexFlatIP, {len(indexes)} layers x {rows} rows x {queries[0].shape[0]} queries, "
          f"float32: median {med:.2f} ms (faiss {faiss.__version__}, {os.cpu_count()} threads)")
    print("faiss_bench: " + json.dumps({"faiss_ms_median": round(med, 3), "layers": len(indexes),
                                         "rows": rows, "queries": int(queries[0].shape[0])}))


if __name__ == "__main__":
    main()
