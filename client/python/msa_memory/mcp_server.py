"""An MCP server over msa_memory (official `mcp` Python SDK, 2.x: MCPServer).

    python -m msa_memory.mcp_server --addr 127.0.0.1:7420 --collection notes \\
        [--encoder lexical|sentence|sentence-torch|hybrid] [--token-file F] \\
        [--transport stdio|http --host 127.0.0.1 --port 8765]

Tools (ids are decimal STRINGS: msad ids are 63-bit, above JavaScript's 2^53):

  remember(text, metadata?)                  -> {id}
  recall(query, k=5, min_score?)             -> {hits: [{id, score, text, metadata}]}
  update(id, text, metadata?)                -> {id, version}   (metadata left out: kept)
  forget(id)                                 -> {id, deleted: true}
  list(after_id="0", limit=20)               -> {notes: [...], next_after_id}  ("0": no more)
  interleave(question, max_rounds=3, k_per_round=2, token_budget=1024, threshold=0.05)
                                             -> {evidence: [...], stop, rounds}

Metadata is any JSON object, stored as UTF-8 JSON. There are NO metadata/tag
filters: msad's Route cannot filter yet (issue 13, deliverable 3), and this server
does not fake them by filtering results after the fact. ``min_score`` is a plain
threshold on the fused routing score.

Failures are MCP tool errors (``isError``), never a crash of the server: an msad
error keeps msad's status and message ("NOT_FOUND: ..."), an unknown id is
msad's NOT_FOUND message, bad arguments are named. msad may be down when the
server starts: the collection is opened on the first call that needs it and
again after a connection failure.

The default encoder is the LexicalEncoder, as for msa_memory.Memory: the dense and
hybrid encoders are not the default until the evaluation of issue 13
(deliverable 2) exists. Use ``--encoder sentence`` for questions that paraphrase
the notes.
"""

import argparse
import os
import sys
import threading

__all__ = ["build_server", "main", "make_encoder"]


def make_encoder(name):
    """lexical | sentence (ONNX) | sentence-torch | hybrid."""
    if name == "lexical":
        from .encoders import LexicalEncoder
        return LexicalEncoder()
    if name in ("sentence", "sentence-onnx"):
        from .sentence import SentenceEncoder
        return SentenceEncoder(backend="onnx")
    if name == "sentence-torch":
        from .sentence import SentenceEncoder
        return SentenceEncoder(backend="torch")
    if name == "hybrid":
        from .sentence import HybridEncoder
        return HybridEncoder()
    raise ValueError("encoder: lexical, sentence, sentence-torch or hybrid")


def build_server(addr, collection, encoder, token=None, create=True, name="msa-memory"):
    """An mcp MCPServer with the memory tools over one msad collection."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from msa_client import MsaError

    from .memory import Memory, MemoryError_

    state = {"mem": None}
    lock = threading.Lock()

    def mem():
        with lock:
            if state["mem"] is None:
                try:
                    state["mem"] = Memory(addr, collection, encoder, token=token, create=create)
                except MsaError as e:
                    raise ToolError(str(e)) from None
                except Exception as e:           # ModelMismatch, a bad address, ...
                    raise ToolError("%s: %s" % (type(e).__name__, e)) from None
            return state["mem"]

    def call(fn):
        """Runs fn(memory); msad's errors become tool errors with its message."""
        m = mem()
        try:
            return fn(m)
        except MsaError as e:
            if e.name in ("UNAVAILABLE",):
                with lock:                       # reconnect on the next call
                    if state["mem"] is m:
                        state["mem"] = None
                        try:
                            m.close()
                        except Exception:
                            pass
            raise ToolError(str(e)) from None
        except KeyError as e:
            if isinstance(e.__cause__, MsaError):      # msad's NOT_FOUND, its message
                raise ToolError(str(e.__cause__)) from None
            raise ToolError("NOT_FOUND: no note with id %s" % e.args[0]) from None
        except (ValueError, TypeError) as e:
            raise ToolError("INVALID_ARGUMENT: %s" % e) from None
        except MemoryError_ as e:                  # e.g. too many concurrent updates
            raise ToolError("%s: %s" % (type(e).__name__, e)) from None

    def note_id(s):
        try:
            i = int(str(s).strip())
        except ValueError:
            raise ToolError("INVALID_ARGUMENT: id: %r is not a decimal integer" % (s,)) from None
        if not 1 <= i < (1 << 63):
            raise ToolError("INVALID_ARGUMENT: id: %d is outside 1..2^63-1" % i)
        return i

    def hit(h):
        return {"id": str(h.id), "score": round(float(h.score), 6), "text": h.text,
                "metadata": _jsonable(h.metadata)}

    def note(d):
        return {"id": str(d["id"]), "text": d["text"], "metadata": _jsonable(d["metadata"]),
                "version": d["version"], "updated_unix_ms": d["updated_unix_ms"]}

    srv = MCPServer(
        name=name,
        instructions=("Long-term memory in msad (collection %r). remember stores a note, "
                      "recall finds notes for a query, interleave answers multi-hop "
                      "questions by recalling in rounds, update/forget/list manage notes. "
                      "Ids are decimal strings. No metadata filters." % collection))

    @srv.tool(description="Store a note in long-term memory. metadata: an optional JSON "
              "object kept with the note. Returns its id (a decimal string).")
    def remember(text: str, metadata: dict | None = None) -> dict:
        if not text.strip():
            raise ToolError("INVALID_ARGUMENT: text: empty")
        i = call(lambda m: m.add(text, metadata))
        return {"id": str(i)}

    @srv.tool(description="Find the k notes that best match a query, best first, with "
              "their routing score (cosine-like, higher is better). min_score: drop hits "
              "scoring below it. There are no metadata filters (msad cannot filter "
              "routes yet).")
    def recall(query: str, k: int = 5, min_score: float | None = None) -> dict:
        if not 1 <= k <= 1024:
            raise ToolError("INVALID_ARGUMENT: k: must be 1..1024")
        hits = call(lambda m: m.search(query, k=k))
        if min_score is not None:
            hits = [h for h in hits if h.score >= min_score]
        return {"hits": [hit(h) for h in hits]}

    @srv.tool(description="Replace a note's text (re-encoded), and its metadata when "
              "given (left out: kept). Returns the new version.")
    def update(id: str, text: str, metadata: dict | None = None) -> dict:
        i = note_id(id)
        v = call(lambda m: m.update(i, text, ... if metadata is None else metadata))
        return {"id": str(i), "version": int(v)}

    @srv.tool(description="Delete a note by id.")
    def forget(id: str) -> dict:
        i = note_id(id)
        call(lambda m: m.delete(i))
        return {"id": str(i), "deleted": True}

    @srv.tool(name="list", description="List notes in id order, one page at a time: "
              "pass next_after_id back as after_id; \"0\" means there is no more.")
    def list_notes(after_id: str = "0", limit: int = 20) -> dict:
        a = 0 if str(after_id).strip() in ("", "0") else note_id(after_id)
        if not 1 <= limit <= 1000:
            raise ToolError("INVALID_ARGUMENT: limit: must be 1..1000")
        notes, nxt = call(lambda m: m.list(after_id=a, limit=limit))
        return {"notes": [note(d) for d in notes], "next_after_id": str(nxt)}

    @srv.tool(description="Multi-hop recall (MSA memory interleave): recall, read the "
              "notes, recall again with what was read, up to max_rounds rounds or "
              "token_budget tokens of evidence; stops when no note scores >= threshold. "
              "Returns the evidence in reading order and why it stopped.")
    def interleave(question: str, max_rounds: int = 3, k_per_round: int = 2,
                   token_budget: int = 1024, threshold: float = 0.05) -> dict:
        if not 1 <= max_rounds <= 16 or not 1 <= k_per_round <= 64:
            raise ToolError("INVALID_ARGUMENT: max_rounds 1..16, k_per_round 1..64")
        r = call(lambda m: m.interleave(question, max_rounds=max_rounds,
                                        k_per_round=k_per_round, token_budget=token_budget,
                                        threshold=threshold))
        return {"evidence": [hit(h) for h in r.evidence], "stop": r.stop,
                "rounds": len(r.trace)}

    srv.memory = mem                  # for tests and embedding applications
    return srv


def _jsonable(m):
    if isinstance(m, (bytes, bytearray)):
        return {"bytes_hex": bytes(m).hex()}
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m msa_memory.mcp_server",
                                 description="MCP server: agent memory in msad")
    ap.add_argument("--addr", default=os.environ.get("MSA_ADDR", "127.0.0.1:7420"),
                    help="msad address (default $MSA_ADDR or 127.0.0.1:7420)")
    ap.add_argument("--collection", default="notes")
    ap.add_argument("--encoder", default="lexical",
                    choices=["lexical", "sentence", "sentence-torch", "hybrid"])
    ap.add_argument("--token-file", help="file holding msad's bearer token ($MSA_TOKEN also)")
    ap.add_argument("--no-create", action="store_true", help="do not create the collection")
    ap.add_argument("--transport", default="stdio", choices=["stdio", "http"])
    ap.add_argument("--host", default="127.0.0.1", help="http: address to listen on")
    ap.add_argument("--port", type=int, default=8765, help="http: port (path /mcp)")
    a = ap.parse_args(argv)
    token = os.environ.get("MSA_TOKEN")
    if a.token_file:
        with open(a.token_file) as f:
            token = f.readline().strip()
    enc = make_encoder(a.encoder)
    srv = build_server(a.addr, a.collection, enc, token=token, create=not a.no_create)
    if a.transport == "stdio":
        srv.run("stdio")
    else:
        srv.run("streamable-http", host=a.host, port=a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
