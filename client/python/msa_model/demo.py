"""python -m msa_model.demo: ingest a folder of text files into msad with an MSA
model, then answer questions with memory from msad, printing which documents each
memory layer selected.

    python -m msa_model.demo --addr 127.0.0.1:7420 --docs notes/ \\
        --checkpoint /path/to/Qwen3-or-MSA --question "Who keeps the ledger?"

Without --checkpoint the tiny random model is used (no download; its answers are
noise, but the memory path is the real one). A Qwen3 checkpoint without MSA
router weights needs --layers/--chunk-tokens/--top-k (its router projections
start random). Files are documents; ids are stable per file name (a hash), so
running again replaces them instead of adding copies.
"""

import argparse
import hashlib
import json
import os
import sys
import time

from msa_client import Client, MsaError

from .memory_client import MsadMemoryClient
from .modeling import MSAModel, MSASettings, tiny_msa_model


def doc_id(name):
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & ((1 << 63) - 1) or 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m msa_model.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--addr", default="127.0.0.1:7420", help="msad address (host:port or unix:path)")
    ap.add_argument("--collection", default="msa-demo")
    ap.add_argument("--docs", help="folder of text files to ingest (*.txt, *.md)")
    ap.add_argument("--checkpoint", help="a Qwen3-family or MSA checkpoint folder on disk")
    ap.add_argument("--layers", help="memory layers for a checkpoint without msa_config, e.g. 18,19,20")
    ap.add_argument("--chunk-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=0, help="documents per layer (0 = the model's)")
    ap.add_argument("--mode", choices=("fetch", "attend"), default="fetch")
    ap.add_argument("--question", action="append", default=[], help="may be repeated")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--token", help="bearer token for msad")
    ap.add_argument("--json", action="store_true", help="one JSON object per answer")
    a = ap.parse_args(argv)

    if a.checkpoint:
        settings = None
        if a.layers:
            settings = MSASettings(layers=tuple(int(x) for x in a.layers.split(",")),
                                   chunk_tokens=a.chunk_tokens, top_k=a.top_k or 16)
        model = MSAModel.from_pretrained(a.checkpoint, settings=settings)
    else:
        model = tiny_msa_model(seed=0)
    client = Client(a.addr, token=a.token, timeout=120)
    mem = MsadMemoryClient(client, a.collection, model, mode=a.mode, top_k=a.top_k)
    try:
        mem.open()
    except MsaError as e:
        if e.name != "NOT_FOUND":
            raise
        mem.create()
        print("created collection %r for %s" % (a.collection, mem.identity))
    names = {}
    if a.docs:
        files = sorted(f for f in os.listdir(a.docs) if f.endswith((".txt", ".md")))
        t0 = time.time()
        tokens = 0
        for f in files:
            with open(os.path.join(a.docs, f), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            i = doc_id(f)
            names[i] = f
            mem.add({i: text})
            tokens += len(model.tokenizer.encode(text))
        dt = time.time() - t0
        print("ingested %d files, %d tokens in %.2f s (%.0f tokens/s, encode + write)" % (
            len(files), tokens, dt, tokens / max(dt, 1e-9)))
    for q in a.question:
        t0 = time.time()
        out = model.generate(q, mem, max_new_tokens=a.max_new_tokens)
        dt = time.time() - t0
        sel = {}
        for l, (ids, scores) in sorted(out["selected"].items()):
            sel[l] = [(names.get(int(i)) or _name_of(client, a.collection, int(i)), round(float(s), 4))
                      for i, s in zip(ids, scores) if int(i)]
        if a.json:
            print(json.dumps({"question": q, "answer": out["text"], "tokens": out["tokens"],
                              "selected": {str(k): v for k, v in sel.items()}, "seconds": dt}))
            continue
        print("\nQ: %s\nA: %r   (%d tokens in %.2f s, %s mode)" % (q, out["text"], len(out["tokens"]), dt, a.mode))
        for l, s in sel.items():
            print("  layer %d selected: %s" % (l, ", ".join("%s (%.3f)" % p for p in s)))
    return 0


def _name_of(client, collection, i):
    try:
        return client.get(collection, i, with_text=True, with_metadata=False,
                          with_tensors=False)["text"][:40].replace("\n", " ") + "..."
    except MsaError:
        return str(i)


if __name__ == "__main__":
    sys.exit(main())
