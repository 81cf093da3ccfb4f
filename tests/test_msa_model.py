"""An MSA model served by msad end to end (msa_model over a real msad on loopback).

The tiny random MSA model (Qwen3 layers, GQA, router K/Q projections; no download)
answers questions three ways and the answers are compared:
  * reference: an in-process memory written HERE, independently of the client -- the
    model's own token K/V/router K pooled per chunk in torch float64, routing by
    SEMANTICS.md in float64 (COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX, ties to the
    smaller id), top-k in torch;
  * fetch mode: MsadMemoryClient, Route + Get of the selected pooled K/V per layer;
  * attend mode: MsadMemoryClient, Attend at msad merged by log-sum-exp.
Asserted: the same selected documents per layer (a difference is allowed only
between documents whose reference scores lie within 1e-5 of each other), logits of
every step within LOGIT_TOL, the same 32 greedy tokens; again after an update and a
delete between two questions. Also: one snapshot for all layers of a prefill while
another client writes (pinned vs the pre-write reference; unpinned shown to differ),
model/collection mismatch refused naming the field, msad gone mid-generation raises
MemoryUnavailable, a document over the message limit is refused naming it.

Run: ~/.cache/msad/venv/bin/python tests/test_msa_model.py (MSA_BIN = build/bin).
"""
import os
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon_util import BIN, Daemon, msad_path  # noqa: E402

PYDIR = os.path.join(os.path.dirname(os.path.abspath(BIN)), "python")
if not os.access(msad_path(), os.X_OK) or not os.path.exists(os.path.join(PYDIR, "msa_model")):
    print("skip: msad or the msa_model package (%s) not built" % PYDIR)
    sys.exit(77)
sys.path.insert(0, PYDIR)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from msa_client import Client, MsaError  # noqa: E402
from msa_model import MemoryUnavailable, MsadMemoryClient, tiny_msa_model  # noqa: E402
from msa_ref import InProcessMemory  # noqa: E402

LOGIT_TOL = 5e-5       # max |logit difference|, float32 end to end (measured ~5e-6)
TIE_TOL = 1e-5
NEW_TOKENS = 32

WORDS = ["apple", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo",
         "juniper", "kelp", "lantern", "marble", "nectar", "onyx", "pepper", "quartz", "raven",
         "saffron", "tundra", "umber", "violet", "willow", "xenon", "yarrow", "zephyr",
         "amber", "basalt", "cedar", "delta"]
DOCS = {i + 1: "Note %d: the keeper of the %s vault is %s; it opens at %d o'clock." % (
    i, w, WORDS[(i * 7) % len(WORDS)].title(), (i * 5) % 12 + 1) for i, w in enumerate(WORDS)}
QUESTIONS = ["Who keeps the cobalt vault?", "When does the raven vault open?",
             "Which vault does Marble keep?", "Tell me about the zephyr vault."]


def same_selection(test, ref_mem, ref_out, out, what):
    """Per layer the same documents, or documents tied within TIE_TOL in the reference."""
    for l, (rids, rsc) in ref_out["selected"].items():
        ids, sc = out["selected"][l]
        if list(map(int, rids)) == list(map(int, ids)):
            np.testing.assert_allclose(sc, rsc, atol=1e-5, err_msg="%s layer %d scores" % (what, l))
            continue
        # Only a reorder/swap among near-ties at equal scores is acceptable.
        test.assertEqual(len(rids), len(ids), "%s layer %d" % (what, l))
        np.testing.assert_allclose(np.sort(sc), np.sort(rsc), atol=TIE_TOL,
                                   err_msg="%s layer %d: %s vs reference %s" % (what, l, ids, rids))


class MSAModelParity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.model = tiny_msa_model(seed=0)
        cls.d = Daemon()
        cls.d.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.d.__exit__(None, None, None)

    def ask(self, ref, mems, q):
        r = self.model.generate(q, ref, max_new_tokens=NEW_TOKENS)
        outs = {}
        for name, mem in mems.items():
            o = self.model.generate(q, mem, max_new_tokens=NEW_TOKENS)
            same_selection(self, ref, r, o, "%s %r" % (name, q))
            self.assertEqual(len(o["logits"]), len(r["logits"]))
            diff = max(float((a - b).abs().max()) for a, b in zip(o["logits"], r["logits"]))
            self.assertLessEqual(diff, LOGIT_TOL, "%s %r: max |logit diff| %.3g" % (name, q, diff))
            self.assertEqual(o["tokens"], r["tokens"], "%s %r: greedy tokens differ" % (name, q))
            outs[name] = (o, diff)
        return r, outs

    def test_parity_fetch_attend_vs_in_process(self):
        m = self.model
        ref = InProcessMemory(m)
        fetch = MsadMemoryClient(self.d.addr, "parity", m, mode="fetch").create()
        attend = MsadMemoryClient(fetch.client, "parity", m, mode="attend").open()
        fetch.add(DOCS)
        for i, t in DOCS.items():
            ref.put(i, t)
        worst = 0.0
        distinct = set()
        for q in QUESTIONS:
            r, outs = self.ask(ref, {"fetch": fetch, "attend": attend}, q)
            worst = max([worst] + [d for _o, d in outs.values()])
            distinct.update(r["tokens"])
            self.assertEqual(len(r["tokens"]), NEW_TOKENS)
        # The memory matters: without it the same question gives other logits.
        empty = InProcessMemory(m)
        e = m.generate(QUESTIONS[0], empty, max_new_tokens=1)
        r0 = m.generate(QUESTIONS[0], ref, max_new_tokens=1)
        self.assertGreater(float((e["logits"][0] - r0["logits"][0]).abs().max()), 1e-2)
        self.assertGreater(len(distinct), 4, "greedy decoding degenerate: parity would be weak")

        # An update and a delete between two questions: all three follow.
        sel = r0["selected"][m.memory_layers[0]][0]
        upd, gone = int(sel[0]), int(sel[1])
        new_text = "Note: the keeper of every vault is now Quillon; all open at noon."
        fetch.update(upd, new_text)
        fetch.delete([gone])
        ref.put(upd, new_text)
        ref.delete(gone)
        r, outs = self.ask(ref, {"fetch": fetch, "attend": attend}, QUESTIONS[0])
        for l, (ids, _s) in r["selected"].items():
            self.assertNotIn(gone, list(map(int, ids)))
        for _name, (o, d) in outs.items():
            worst = max(worst, d)
            for l, (ids, _s) in o["selected"].items():
                self.assertNotIn(gone, list(map(int, ids)), "deleted document still selected")
        print("parity: %d docs, %d questions + 1 after update/delete, %d tokens each: "
              "max |logit diff| %.2e (tolerance %.0e), same tokens and documents; wire per "
              "prefill+decode: fetch %s, attend %s" % (
                  len(DOCS), len(QUESTIONS), NEW_TOKENS, worst, LOGIT_TOL, fetch.wire, attend.wire))

    def test_one_snapshot_per_prefill(self):
        """A writer replaces every document between two layers' memory calls: pinned,
        the answer equals the reference on the state before the write."""
        m = self.model
        ref = InProcessMemory(m)
        mem = MsadMemoryClient(self.d.addr, "pin", m, mode="fetch").create()
        docs = dict(list(DOCS.items())[:12])
        mem.add(docs)
        for i, t in docs.items():
            ref.put(i, t)
        before = m.generate(QUESTIONS[1], ref, max_new_tokens=4)
        writer = MsadMemoryClient(Client(self.d.addr), "pin", m, mode="fetch")
        new = {i: "Replaced %d: %s" % (i, t[::-1]) for i, t in docs.items()}
        enc = {i: writer._doc(i, t) for i, t in new.items()}

        class Interfering:
            """Delegates to the client; after layer 1's query, another client writes."""
            def __init__(self, inner):
                self.inner, self.mode, self.done = inner, inner.mode, False

            def __getattr__(self, n):
                return getattr(self.inner, n)

            def doc_query(self, rq, mask, layer):
                r = self.inner.doc_query(rq, mask, layer)
                if not self.done:
                    self.done = True
                    from msa_client import memory_pb2 as pb
                    writer._write([pb.WriteOp(put=d) for d in enc.values()], "interfere")
                return r

        got = m.generate(QUESTIONS[1], Interfering(mem), max_new_tokens=4)
        same_selection(self, ref, before, got, "pinned")
        diff = max(float((a - b).abs().max()) for a, b in zip(got["logits"], before["logits"]))
        self.assertLessEqual(diff, LOGIT_TOL)
        self.assertEqual(got["tokens"], before["tokens"])
        # The same interference without a pin: later layers read the new documents.
        for i, t in docs.items():
            mem.update(i, t)
        unpinned = Interfering(mem)
        unpinned.pinned = None
        got2 = m.generate(QUESTIONS[1], unpinned, max_new_tokens=4)
        diff2 = max(float((a - b).abs().max()) for a, b in zip(got2["logits"], before["logits"]))
        self.assertGreater(diff2, 1e-3, "unpinned run unaffected: the test would not catch a missing pin")
        st = mem.client.stats()
        print("snapshot pin: pinned max |logit diff| %.2e vs pre-write reference; unpinned %.2e; "
              "stats %s" % (diff, diff2, {k: v for k, v in st.get("counters", {}).items() if "snap" in k}))

    def test_mismatch_refused(self):
        m = self.model
        MsadMemoryClient(self.d.addr, "shape", m).create()
        other = tiny_msa_model(seed=0, chunk_tokens=16)
        with self.assertRaises(ValueError) as cm:
            MsadMemoryClient(self.d.addr, "shape", other).open()
        self.assertIn("chunk_tokens", str(cm.exception))
        other_layers = tiny_msa_model(seed=0, memory_layers=(2, 3))
        with self.assertRaises(ValueError) as cm:
            MsadMemoryClient(self.d.addr, "shape", other_layers).open()
        self.assertIn("layers", str(cm.exception))
        # Same shapes, other checkpoint: msad itself refuses its latents (model identity).
        seed1 = tiny_msa_model(seed=1)
        with self.assertRaises(MsaError) as cm:
            MsadMemoryClient(self.d.addr, "shape", seed1).add({1: "x"})
        self.assertEqual(cm.exception.name, "FAILED_PRECONDITION")

    def test_document_over_message_limit(self):
        m = self.model
        mem = MsadMemoryClient(Client(self.d.addr, max_message_mb=1), "big", m).create()
        with self.assertRaises(ValueError) as cm:
            mem.add({7: "word " * 3600})   # 18K tokens: ~1.3 MB of latents
        self.assertIn("document 7", str(cm.exception))
        self.assertIn("split", str(cm.exception))
        self.assertEqual(mem.client.describe("big")["documents"], 0)   # nothing written


class MSACheckpoint(unittest.TestCase):
    def test_checkpoint_on_disk_loads_and_answers_the_same(self):
        """The real loading path: a checkpoint folder (config.json with msa_config,
        model.safetensors, tokenizer.json) written by transformers, loaded by
        MSAModel.from_pretrained, gives the original model's logits and selections."""
        import tempfile
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
        from msa_model import MSAModel
        m = tiny_msa_model(seed=2)
        tmp = tempfile.mkdtemp(prefix="msa-ckpt-")
        m.lm.save_pretrained(tmp)
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel()
        tk.train_from_iterator(list(DOCS.values()) + QUESTIONS, trainers.BpeTrainer(
            vocab_size=257, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(tmp)
        loaded = MSAModel.from_pretrained(tmp, template=m.template)
        self.assertEqual(loaded.settings, m.settings)
        ids = loaded.tokenizer.encode(QUESTIONS[0])
        self.assertGreater(len(ids), 3)
        self.assertLess(max(ids), m.config.vocab_size)
        m.tokenizer = loaded.tokenizer    # one tokenizer for documents, template, question
        ref_a = InProcessMemory(m)
        ref_b = InProcessMemory(loaded)
        for i, t in list(DOCS.items())[:8]:
            ref_a.put(i, t)
            ref_b.put(i, t)
        a = m.generate(ids, ref_a, max_new_tokens=8)
        b = loaded.generate(ids, ref_b, max_new_tokens=8)
        self.assertEqual(a["tokens"], b["tokens"])
        for x, y in zip(a["logits"], b["logits"]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        with self.assertRaises(FileNotFoundError):
            MSAModel.from_pretrained(tempfile.mkdtemp())


class MSAModelDaemonGone(unittest.TestCase):
    def test_msad_killed_mid_generation(self):
        m = tiny_msa_model(seed=0)
        with Daemon() as d:
            for mode in ("fetch", "attend"):
                mem = MsadMemoryClient(Client(d.addr, timeout=5), "gone-" + mode, m, mode=mode)
                mem.create().add(dict(list(DOCS.items())[:6]))
            calls = {"n": 0}
            mem = MsadMemoryClient(Client(d.addr, timeout=5), "gone-attend", m, mode="attend")
            real = mem.doc_attend

            def dying(*a, **kw):
                calls["n"] += 1
                if calls["n"] == 3:
                    d.kill()
                return real(*a, **kw)
            mem.doc_attend = dying
            with self.assertRaises(MemoryUnavailable) as cm:
                m.generate(QUESTIONS[0], mem, max_new_tokens=8)
            self.assertIn("did not answer", str(cm.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
