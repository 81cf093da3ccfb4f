#!/usr/bin/env python3
"""agent_notes: an agent's long-term notes in msad (msa_memory example).

    PYTHONPATH=build/python client/python/examples/agent_notes.py --addr 127.0.0.1:7420 \
        remember "The Orvaline ledger was entrusted to Tessa Quibble." --tag ledger
    ... recall "who has the Orvaline ledger?" -k 3
    ... ask "Where does the keeper of the Orvaline ledger live now?"   # memory interleave
    ... show ID | forget ID | list

Uses the LexicalEncoder (a deterministic lexical baseline, not an MSA model): notes
are routed by shared words, names weigh more. The collection (default "notes") is
created on first use with the encoder's identity as its model.
"""
import argparse
import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
for p in (os.path.join(here, "..", "..", "..", "build", "python"), os.path.join(here, "..")):
    if os.path.isdir(p) and p not in sys.path:
        sys.path.append(p)

from msa_client import MsaError  # noqa: E402
from msa_memory import LexicalEncoder, Memory  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="remember / recall / forget / ask: an agent's "
                                 "notes in msad", epilog=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default=os.environ.get("MSA_ADDR", "127.0.0.1:7420"),
                    help="msad address (default $MSA_ADDR or 127.0.0.1:7420)")
    ap.add_argument("--collection", default="notes")
    ap.add_argument("--token", default=os.environ.get("MSA_TOKEN"), help="bearer token ($MSA_TOKEN)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("remember", help="store a note (text, or - for stdin); prints its id")
    p.add_argument("text")
    p.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    p = sub.add_parser("recall", help="the notes that best match a query")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p = sub.add_parser("ask", help="multi-hop recall (memory interleave) for a question")
    p.add_argument("question")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-k", type=int, default=2, help="notes read per round")
    p.add_argument("--budget", type=int, default=1024, help="token (word) budget of evidence")
    p.add_argument("--threshold", type=float, default=0.05)
    p = sub.add_parser("forget", help="delete a note")
    p.add_argument("id", type=int)
    p = sub.add_parser("update", help="replace a note's text")
    p.add_argument("id", type=int)
    p.add_argument("text")
    p = sub.add_parser("show", help="print one note")
    p.add_argument("id", type=int)
    sub.add_parser("list", help="list note ids with their first line")
    a = ap.parse_args(argv)

    try:
        mem = Memory(a.addr, a.collection, LexicalEncoder(), token=a.token, timeout=30)
    except MsaError as e:
        print("agent_notes: %s: %s" % (a.addr, e), file=sys.stderr)
        return 1
    out = (lambda o: print(json.dumps(o, ensure_ascii=False))) if a.json else None
    try:
        if a.cmd == "remember":
            text = sys.stdin.read() if a.text == "-" else a.text
            i = mem.add(text, {"tags": a.tag} if a.tag else None)
            out({"id": i}) if out else print(i)
        elif a.cmd == "recall":
            hits = mem.search(a.query, a.k)
            if out:
                out([h._asdict() for h in hits])
            for h in hits if not out else ():
                print("%-20d %.3f  %s" % (h.id, h.score, h.text.replace("\n", " ")[:100]))
        elif a.cmd == "ask":
            r = mem.interleave(a.question, a.rounds, a.k, a.budget, a.threshold)
            if out:
                out({"evidence": [h._asdict() for h in r.evidence], "trace": r.trace, "stop": r.stop})
            else:
                for t in r.trace:
                    print("round %d: candidates %s -> read %s%s" % (
                        t["round"], [(i, round(s, 3)) for i, s in t["candidates"]], t["read"],
                        " (skipped %s: budget)" % t["skipped"] if t["skipped"] else ""))
                print("stopped: %s" % r.stop)
                for n, h in enumerate(r.evidence, 1):
                    print("[%d] %d (%.3f) %s" % (n, h.id, h.score, h.text.replace("\n", " ")))
        elif a.cmd == "forget":
            mem.delete(a.id)
            out({"deleted": a.id}) if out else print("forgot %d" % a.id)
        elif a.cmd == "update":
            v = mem.update(a.id, a.text)
            out({"id": a.id, "version": v}) if out else print("%d now version %d" % (a.id, v))
        elif a.cmd == "show":
            n = mem.get(a.id)
            out(n) if out else print("%d v%d %s\n%s" % (n["id"], n["version"],
                                                         json.dumps(n["metadata"]), n["text"]))
        elif a.cmd == "list":
            for d in mem.client.iter_docs(a.collection):
                n = mem.get(d["id"])
                first = n["text"].split("\n", 1)[0][:80]
                out({"id": d["id"], "text": first}) if out else print("%-20d %s" % (d["id"], first))
    except KeyError as e:
        print("agent_notes: no note %s" % e, file=sys.stderr)
        return 1
    except MsaError as e:
        print("agent_notes: %s" % e, file=sys.stderr)
        return 1
    finally:
        mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
