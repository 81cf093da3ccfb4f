#!/usr/bin/env python3
"""bench_torch_route.py — the peer for msad's GPU routing benchmark: the MSA
paper's reference routing algorithm written in PyTorch, on the same shapes.

Per memory layer (18 for MSA-4B: H=8 kv heads, Hq=32 query heads, D=128, one
router-key row per chunk of P=64 tokens, BF16 keys):
  scores = per-slice matmul of the group-summed queries with the keys
           (slices of SLICE_ROWS rows, so scratch stays bounded as in the
           reference code), mean over query tokens (QUERY_MEAN) or max (QUERY_MAX),
  doc score = scatter_reduce(amax) of the chunk scores by document,
  top-k (16) documents.
Keys are generated on the device (random BF16), as bench_gpu_route does; the
time covers the 18 layers of one query, after warm-up, synchronised.

Usage: python3 tests/bench_torch_route.py [--tokens 10e6 100e6] [--doc-rows 1 16]
       [--reduce mean max] [--reps 5] [--device cuda|cpu]
Prints human lines and one `JSON {...}` line per measurement. Exit 77 when
PyTorch (or, with --device cuda, a GPU) is missing.
"""
import argparse
import json
import sys
import time

try:
    import torch
except ImportError:
    print("skipped: PyTorch is not installed")
    sys.exit(77)

LAYERS, H, HQ, D, P, T, TOP_K = 18, 8, 32, 128, 64, 64, 16
SLICE_ROWS = 1 << 20


def route_layer(keys, doc_of_row, n_docs, qsum, reduce):
    """keys [R, H*D] bf16; qsum [T, H*D] float32 (group-summed per kv head)."""
    R = keys.shape[0]
    row_scores = torch.empty(R, dtype=torch.float32, device=keys.device)
    qt = qsum.to(torch.bfloat16).t().contiguous()
    for r0 in range(0, R, SLICE_ROWS):
        s = keys[r0:r0 + SLICE_ROWS] @ qt                 # [rows, T], fp32 accumulate
        s = s.float()
        row_scores[r0:r0 + SLICE_ROWS] = s.mean(1) if reduce == "mean" else s.amax(1)
    doc = torch.full((n_docs,), float("-inf"), device=keys.device)
    doc = doc.scatter_reduce(0, doc_of_row, row_scores, reduce="amax", include_self=True)
    return torch.topk(doc, TOP_K)


def bench(tokens, doc_rows, reduce, reps, device):
    rows = int(tokens) // P
    n_docs = (rows + doc_rows - 1) // doc_rows
    gen = torch.Generator(device=device).manual_seed(1)
    doc_of_row = torch.arange(rows, device=device) // doc_rows
    q = torch.randn(T, HQ, D, generator=gen, device=device)
    qsum = q.view(T, H, HQ // H, D).sum(2).reshape(T, H * D) / HQ
    layer_keys = []
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 64 << 30
    per_layer = rows * H * D * 2
    # Keep every layer resident when it fits (as msad does); otherwise one layer
    # buffer is reused for all 18 (same bytes read, same work).
    resident = per_layer * LAYERS < free * 0.8
    for _ in range(LAYERS if resident else 1):
        layer_keys.append(torch.randn(rows, H * D, generator=gen, device=device,
                                      dtype=torch.float32).to(torch.bfloat16))

    def once():
        for layer in range(LAYERS):
            route_layer(layer_keys[layer % len(layer_keys)], doc_of_row, n_docs, qsum, reduce)
        if device == "cuda":
            torch.cuda.synchronize()

    once()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    med = times[len(times) // 2]
    key_bytes = per_layer * LAYERS
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"torch reference route: {tokens/1e6:.0f}M tokens, {doc_rows} rows/doc, query {reduce}: "
          f"median {med:.2f} ms over {reps} ({key_bytes/1e9:.1f} GB of BF16 keys, "
          f"{'resident' if resident else 'one layer buffer reused'}) on {name}")
    print("JSON " + json.dumps({"bench": "torch_route", "tokens": tokens, "doc_rows": doc_rows,
                                "query_reduce": reduce, "ms_median": med, "key_bytes": key_bytes,
                                "resident": resident, "device": name,
                                "torch": torch.__version__}))
    del layer_keys
    if device == "cuda":
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, nargs="+", default=[10e6, 100e6])
    ap.add_argument("--doc-rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reduce", nargs="+", default=["mean", "max"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device for PyTorch")
        sys.exit(77)
    for tokens in a.tokens:
        for doc_rows in a.doc_rows:
            for reduce in a.reduce:
                bench(int(tokens), doc_rows, reduce, a.reps, a.device)


if __name__ == "__main__":
    main()
