"""msa_memory.mcp_server through the official MCP SDK's own client session, against
a real msad.

  * stdio: the server spawned as a subprocess (`python -m msa_memory.mcp_server`,
    the venv's interpreter, lexical encoder): the tool list; remember (with JSON
    metadata) -> recall finds it with its metadata and score; min_score drops hits;
    update (text replaced, metadata kept, version 2); list pages through every note
    with next_after_id; interleave follows a two-hop chain; forget, then forget
    again -> tool error "NOT_FOUND"; a malformed id -> "INVALID_ARGUMENT" naming
    the id; an msad error keeps msad's own message (the collection dropped behind
    the server's back: the tool error carries the same text a direct msa_client call
    gets); the server answers after every error;
  * a collection of another encoder: tool errors naming ModelMismatch and the
    collection;
  * msad not running: tool calls are errors with gRPC's UNAVAILABLE, the server
    stays up;
  * streamable HTTP on 127.0.0.1 with the dense encoder (--encoder sentence): a
    paraphrased question recalls its note.

Run: MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/test_mcp.py (exit 77 when
msad or the msa_client package is not built).
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon_util import Daemon, free_port, msad_path  # noqa: E402
import eval_memory as EV  # noqa: E402
import paraphrase_set as PS  # noqa: E402

if not os.access(msad_path(), os.X_OK) or not os.path.exists(
        os.path.join(EV.PYDIR, "msa_client", "memory_pb2.py")):
    print("skip: msad or the msa_client package (%s) not built" % EV.PYDIR)
    sys.exit(77)
EV.setup_paths()

from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from msa_client import Client, MsaError  # noqa: E402
from msa_client import memory_pb2 as pb  # noqa: E402

ENV = {"PYTHONPATH": EV.PYDIR, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
for k in ("MSA_MEMORY_CACHE", "HOME"):
    if k in os.environ:
        ENV[k] = os.environ[k]


def server_args(addr, collection, *more):
    return ["-m", "msa_memory.mcp_server", "--addr", addr, "--collection", collection] + list(more)


async def call(s, tool, **args):
    """(structured result or None, error text or None)."""
    r = await s.call_tool(tool, args)
    text = r.content[0].text if r.content else ""
    if r.is_error:
        return None, text
    return (r.structured_content if r.structured_content is not None else json.loads(text)), None


async def ok(s, tool, **args):
    res, err = await call(s, tool, **args)
    assert err is None, "%s failed: %s" % (tool, err)
    return res


class Stdio(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon().start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.d.cleanup()

    def run_session(self, collection, body, addr=None, *more):
        params = StdioServerParameters(command=sys.executable,
                                       args=server_args(addr or self.d.addr, collection, *more),
                                       env=ENV)

        async def go():
            with open(os.devnull, "w") as devnull:
                async with stdio_client(params, errlog=devnull) as (r, w):
                    async with ClientSession(r, w) as s:
                        await s.initialize()
                        await body(s)
        asyncio.run(go())

    def test_tools(self):
        async def body(s):
            tools = {t.name: t for t in (await s.list_tools()).tools}
            self.assertEqual(set(tools), {"remember", "recall", "update", "forget", "list",
                                          "interleave"})
            self.assertIn("no metadata filters", tools["recall"].description.lower())

            a = (await ok(s, "remember", text="The Orvaline ledger was entrusted to Tessa Quibble.",
                          metadata={"user": "42", "kind": "fact"}))["id"]
            b = (await ok(s, "remember", text="Tessa Quibble moved to the harbour town of Selmouth."))["id"]
            c = (await ok(s, "remember", text="The bakery on Fenn Street sells rye bread on Sundays."))["id"]
            self.assertIsInstance(a, str)
            self.assertGreater(int(a), 0)

            hits = (await ok(s, "recall", query="who has the Orvaline ledger?", k=2))["hits"]
            self.assertEqual(hits[0]["id"], a)
            self.assertEqual(hits[0]["metadata"], {"user": "42", "kind": "fact"})
            self.assertGreater(hits[0]["score"], 0.1)
            none = (await ok(s, "recall", query="who has the Orvaline ledger?", k=2,
                             min_score=hits[0]["score"] + 1e-3))["hits"]
            self.assertEqual(none, [])

            u = await ok(s, "update", id=a, text="The Orvaline ledger was handed to Tessa Quibble.")
            self.assertEqual(u, {"id": a, "version": 2})
            hits = (await ok(s, "recall", query="Orvaline ledger handed", k=1))["hits"]
            self.assertEqual((hits[0]["id"], hits[0]["text"]),
                             (a, "The Orvaline ledger was handed to Tessa Quibble."))
            self.assertEqual(hits[0]["metadata"], {"user": "42", "kind": "fact"})   # kept

            seen, after = [], "0"
            while True:
                page = await ok(s, "list", after_id=after, limit=2)
                self.assertLessEqual(len(page["notes"]), 2)
                seen += [n["id"] for n in page["notes"]]
                after = page["next_after_id"]
                if after == "0":
                    break
            self.assertEqual(sorted(seen, key=int), sorted([a, b, c], key=int))

            r = await ok(s, "interleave", question="Where does the keeper of the Orvaline "
                         "ledger live now?", max_rounds=3, k_per_round=1)
            ev = [e["id"] for e in r["evidence"]]
            self.assertEqual(ev[:2], [a, b])

            self.assertEqual(await ok(s, "forget", id=c), {"id": c, "deleted": True})
            _, err = await call(s, "forget", id=c)
            self.assertIn("NOT_FOUND", err)
            _, err = await call(s, "update", id=c, text="x")
            self.assertIn("NOT_FOUND", err)
            _, err = await call(s, "forget", id="abc")
            self.assertIn("INVALID_ARGUMENT", err)
            self.assertIn("'abc'", err)
            _, err = await call(s, "recall", query="x", k=0)
            self.assertIn("k: must be 1..1024", err)
            _, err = await call(s, "remember", text="   ")
            self.assertIn("text: empty", err)

            # An msad error keeps msad's message: drop the collection behind the server.
            with Client(self.d.addr) as cl:
                cl.drop_collection("mcp_stdio")
                with self.assertRaises(MsaError) as cm:
                    cl.write("mcp_stdio", [pb.WriteOp(delete_id=int(a))])
            _, err = await call(s, "forget", id=a)
            self.assertIsNotNone(err)
            self.assertIn(str(cm.exception), err)
            # ... and the server still answers.
            self.assertEqual(len((await s.list_tools()).tools), 6)
        self.run_session("mcp_stdio", body)

    def test_encoder_mismatch(self):
        from msa_memory import LexicalEncoder, Memory
        Memory(self.d.addr, "mcp_other", LexicalEncoder(head_dim=64)).close()

        async def body(s):
            _, err = await call(s, "remember", text="hello")
            self.assertIn("ModelMismatch", err)
            self.assertIn("mcp_other", err)
            _, err = await call(s, "recall", query="hello")
            self.assertIn("ModelMismatch", err)
        self.run_session("mcp_other", body)

    def test_msad_down(self):
        port = free_port()

        async def body(s):
            for _ in range(2):
                _, err = await call(s, "remember", text="hello")
                self.assertIn("UNAVAILABLE", err)
            self.assertEqual(len((await s.list_tools()).tools), 6)
        self.run_session("nowhere", body, "127.0.0.1:%d" % port)


class Http(unittest.TestCase):
    def test_streamable_http_dense(self):
        with Daemon() as d:
            port = free_port()
            proc = subprocess.Popen([sys.executable] + server_args(
                d.addr, "mcp_http", "--encoder", "sentence", "--transport", "http",
                "--port", str(port)), env=dict(os.environ, **ENV),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), 0.5).close()
                        break
                    except OSError:
                        self.assertIsNone(proc.poll(), "the MCP server exited")
                        self.assertLess(time.monotonic(), deadline, "no HTTP listener")
                        time.sleep(0.2)

                async def go():
                    async with streamable_http_client("http://127.0.0.1:%d/mcp" % port) as (r, w):
                        async with ClientSession(r, w) as s:
                            await s.initialize()
                            ids = []
                            for f, _ in PS.PAIRS[:6]:
                                ids.append((await ok(s, "remember", text=f))["id"])
                            for t in PS.DISTRACTORS[:6]:
                                await ok(s, "remember", text=t)
                            found = 0
                            for (f, q), i in zip(PS.PAIRS[:6], ids):
                                h = (await ok(s, "recall", query=q, k=1))["hits"]
                                found += h[0]["id"] == i
                            print("MCP over HTTP, dense encoder: %d/6 paraphrased questions "
                                  "recall their note first" % found)
                            self.assertGreaterEqual(found, 5)
                            _, err = await call(s, "forget", id="1")
                            self.assertIn("NOT_FOUND", err)
                asyncio.run(go())
            finally:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    unittest.main(verbosity=2)
