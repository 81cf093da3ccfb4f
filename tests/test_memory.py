"""msa_memory (agent memory on msad) against a real msad on loopback.

  * CRUD: add / add_many (one commit per batch) / get / update / delete, visible to
    search at once; random ids with expect_absent and retry on a collision;
  * model identity: a collection of another encoder is refused client-side
    (ModelMismatch) and by msad (FAILED_PRECONDITION on Write and Route);
  * search: ids and scores checked against an fp64 NumPy recomputation from the
    encoder's outputs (independent of msad) incl. the layer fusion rule;
  * interleave: trace, budget and threshold stops;
  * a bounded evaluation on real text (1K fortunes, 30 single-hop facts, 30 two-hop
    chains; tests/eval_memory.py): lexical recall@5 above a floor, and interleave
    beats single-round search on two-hop chains by a wide margin;
  * MSAEncoder vs a direct computation from a small random Qwen3's weights: SKIPPED
    (with the reason printed) where torch/transformers are absent.

Run: MSA_BIN=build/bin ~/.cache/msad/venv/bin/python tests/test_memory.py. Exits 77 when msad or
the msa_client package is not built; the bounded evaluation is skipped (reported)
when the `fortunes` package is missing, and its TF-IDF line when python3-sklearn is.
"""
import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from daemon_util import Daemon, msad_path  # noqa: E402
import eval_memory as EV  # noqa: E402
import oracle  # noqa: E402

if not os.access(msad_path(), os.X_OK) or not os.path.exists(
        os.path.join(EV.PYDIR, "msa_client", "memory_pb2.py")):
    print("skip: msad or the msa_client package (%s) not built" % EV.PYDIR)
    sys.exit(77)
EV.setup_paths()

import grpc  # noqa: E402

import msa_memory  # noqa: E402
from msa_client import MsaError  # noqa: E402
from msa_memory import LexicalEncoder, Memory, ModelMismatch  # noqa: E402
from msa_memory import memory as memmod  # noqa: E402

FORTUNES = EV.load_fortunes()


# ---- fp64 reference of routing + fusion, from the encoder's outputs ------------------

def _unit(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def bf16_round(x):
    """x rounded to bf16 (the reference's rounding, oracle.py)."""
    return oracle.round_to(oracle.BF16, x)


def ref_layer_scores(keys, rq):
    """COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX in float64. keys {id: K [C, H, D]},
    rq [T, Hq, D] (Hq = H here). Returns {id: score}."""
    q = _unit(np.asarray(rq, np.float64))
    out = {}
    for i, k in keys.items():
        kn = _unit(np.asarray(k, np.float64))
        s = np.einsum("tjd,cjd->tjc", q, kn).mean(axis=1)       # [T, C]
        out[i] = float(s.max())
    return out


def ref_search(docs_keys, enc, query, k, depth, exclude=(), encoded=None):
    """The fused top k as Memory documents it (mean over layers, a document missing
    from a layer's top `depth` gets that layer's depth-th score; ties by id)."""
    q = encoded or enc.encode_query(query)
    per, full = {}, {}
    for l, (rq, _q) in q.layers.items():
        sc = ref_layer_scores({i: kk[l] for i, kk in docs_keys.items() if i not in exclude}, rq)
        ranked = sorted(sc.items(), key=lambda p: (-p[1], p[0]))[:depth]
        per[l] = ranked
        full[l] = sc
    cand = {i for r in per.values() for i, _ in r}
    tot = dict.fromkeys(cand, 0.0)
    for l, r in per.items():
        m = dict(r)
        floor = r[-1][1]
        for i in cand:
            tot[i] += m.get(i, floor)
    fused = sorted(((i, s / len(per)) for i, s in tot.items()), key=lambda p: (-p[1], p[0]))
    return fused[:k], per, full


class MemoryTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(args=["--backend", "cpu", "--threads", "2", "--sync", "nosync"]).start()
        cls.addr = cls.d.addr

    @classmethod
    def tearDownClass(cls):
        try:
            cls.d.stop()
        finally:
            cls.d.cleanup()

    # -- CRUD -------------------------------------------------------------------------
    def test_crud(self):
        with Memory(self.addr, "crud", LexicalEncoder()) as m:
            a = m.add("The spare key of the Brennick cottage is under the blue flower pot.",
                      {"tag": "home", "n": 1})
            b = m.add("Ada's locker code at the Quorvale gym is 4711.")
            self.assertTrue(0 < a < 2**63 and 0 < b < 2**63 and a != b)
            g = m.get(a)
            self.assertEqual(g["metadata"], {"tag": "home", "n": 1})
            self.assertEqual(g["version"], 1)
            self.assertIn("Brennick", g["text"])
            hits = m.search("where is the key of the Brennick cottage?", k=2)
            self.assertEqual(hits[0].id, a)
            hid, score, text, meta = hits[0]
            self.assertEqual((text, meta), (g["text"], g["metadata"]))
            self.assertGreater(score, hits[1].score)
            # update: new text routed at once, metadata kept unless given
            self.assertEqual(m.update(a, "The spare key of the Brennick cottage now hangs in "
                                         "the garden shed."), 2)
            g = m.get(a)
            self.assertEqual((g["version"], g["metadata"]), (2, {"tag": "home", "n": 1}))
            self.assertEqual(m.search("garden shed Brennick", k=1)[0].id, a)
            m.update(a, g["text"], metadata=None)
            self.assertIsNone(m.get(a)["metadata"])
            # delete: gone from get and search
            m.delete(b)
            with self.assertRaises(KeyError):
                m.get(b)
            with self.assertRaises(KeyError):
                m.delete(b)
            with self.assertRaises(KeyError):
                m.update(b, "x")
            self.assertNotIn(b, [h.id for h in m.search("Ada locker code Quorvale gym", k=5)])
            self.assertEqual(len(m), 1)
            # bytes metadata and empty text
            c = m.add("", b"\x00\xffraw")
            self.assertEqual(m.get(c)["metadata"], b"\x00\xffraw")

    def test_add_many_batches_and_id_retry(self):
        with Memory(self.addr, "batches", LexicalEncoder()) as m:
            seq0 = m.client.stats()["commit_seq"]
            texts = ["note number %d about topic %s" % (i, "abcdefghij"[i % 10]) for i in range(20)]
            ids = m.add_many(texts, [{"i": i} for i in range(20)], batch=7)
            self.assertEqual(m.client.stats()["commit_seq"] - seq0, 3)   # ceil(20/7) commits
            self.assertEqual(len(set(ids)), 20)
            self.assertEqual(m.get(ids[13])["metadata"], {"i": 13})
            # collision: the first id drawn exists -> ALREADY_EXISTS -> retried with new ids
            orig = memmod._new_id
            seq = iter([ids[0]])
            memmod._new_id = lambda: next(seq, None) or orig()
            try:
                n = m.add("a note after a collision")
            finally:
                memmod._new_id = orig
            self.assertNotEqual(n, ids[0])
            self.assertEqual(m.get(ids[0])["text"], texts[0])     # not overwritten
            self.assertEqual(m.get(n)["text"], "a note after a collision")
            # explicit ids replace (no expect_absent)
            m.add_many(["replaced"], ids=[ids[1]])
            self.assertEqual(m.get(ids[1])["version"], 2)

    # -- model identity ---------------------------------------------------------------
    def test_model_mismatch(self):
        e1, e2 = LexicalEncoder(seed=0), LexicalEncoder(seed=1)
        self.assertNotEqual(e1.identity, e2.identity)
        # every setting that changes latents or queries changes the identity, and v1
        # collections (32-word chunks, char layer) are refused by v2 encoders
        ids = {LexicalEncoder(**kw).identity for kw in
               ({}, {"chunk_tokens": 32}, {"char_layer": True}, {"focus_gate": 0.5},
                {"kv_heads": 4}, {"head_dim": 64}, {"caps_boost": 1.0})}
        self.assertEqual(len(ids), 7)
        self.assertTrue(e1.identity.startswith("msa_memory.LexicalEncoder/v2:"))
        with Memory(self.addr, "model", e1) as m:
            m.add("Only latents of encoder one go here.")
            self.assertEqual(m.client.describe("model")["schema"]["model"], e1.identity)
        with self.assertRaises(ModelMismatch):
            Memory(self.addr, "model", e2)
        # bypass the client-side check: msad itself refuses the other model
        with Memory(self.addr, "model2", e2) as m2:
            m2.collection = "model"
            with self.assertRaises(MsaError) as cm:
                m2.add("latents of encoder two")
            self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
            with self.assertRaises(MsaError) as cm:
                m2.search("encoder one", k=1)
            self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        with Memory(self.addr, "model", e1) as m:
            self.assertEqual(len(m), 1)
        # a missing collection with create=False
        with self.assertRaises(MsaError) as cm:
            Memory(self.addr, "nope", e1, create=False)
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)

    # -- exact search -----------------------------------------------------------------
    def _exact(self, name, kv_dtype, routing_dtype, tol, **enc_kw):
        enc = LexicalEncoder(**enc_kw)
        texts = (FORTUNES[:300] if FORTUNES else
                 ["text %d with words w%d and w%d" % (i, i % 17, i % 5) for i in range(300)])
        texts = texts + [" ".join(texts[i:i + 5]) for i in range(0, 60, 5)]   # multi-chunk docs
        ids = list(range(1, len(texts) + 1))
        with Memory(self.addr, name, enc, kv_dtype=kv_dtype, routing_dtype=routing_dtype) as m:
            m.add_many(texts, ids=ids, batch=100)
            encs = enc.encode_documents(texts)
            self.assertTrue(any(e.chunks > 1 for e in encs))
            rnd = bf16_round if kv_dtype == "bf16" else (lambda x: x)
            keys = {i: {l: rnd(e.layers[l][0]) for l in enc.layers} for i, e in zip(ids, encs)}
            rng = np.random.default_rng(5)
            queries = [texts[int(i)][:80] for i in rng.integers(0, len(texts), 12)]
            queries += ["computer program bug", "love and marriage", "zzz qqq", "",
                        "The Cat sat.\n\nOn the mat, and then it slept soundly"]
            checked = 0
            for qi, q in enumerate(queries):
                k, depth = 8, 40
                exclude = ids[:3] if qi % 3 == 0 else ()
                m.depth = depth
                got, per_got = m.route(q, k, exclude_ids=exclude)
                want, per_want, full = ref_search(keys, enc, q, k, depth, exclude)
                # per layer: scores agree; ids agree except across near-ties
                for l in enc.layers:
                    gi, gs = per_got[l]
                    wi = [i for i, _ in per_want[l]]
                    ws = [s for _, s in per_want[l]]
                    self.assertEqual(len(gi), len(wi))
                    np.testing.assert_allclose(gs, ws, atol=tol, rtol=0, err_msg="query %r layer %d" % (q, l))
                    for a, b, s in zip(gi, wi, ws):
                        if a != b:
                            self.assertLess(abs(full[l][a] - s), 2 * tol,
                                            "query %r layer %d: %d vs %d" % (q, l, a, b))
                # fused: recompute the fusion from msad's per-layer lists (exact), and
                # compare with the fp64 fused list (up to near-ties)
                self.assertEqual(got, msa_memory.fuse(per_got, k, "mean"))
                for (a, sa), (b, sb) in zip(got, want):
                    self.assertLess(abs(sa - sb), 2 * tol, q)
                    if a != b:
                        self.assertLess(abs(sa - dict(want).get(a, -9)), 3 * tol, q)
                    else:
                        checked += 1
            self.assertGreater(checked, 0.8 * k * len(queries) - 1)
            m.depth = None
            hits = m.search(texts[7][:60], k=3)
            self.assertEqual(hits[0].text, texts[7])

    def test_search_exact_f32(self):
        # two layers (words + character trigrams): the layer fusion is exercised too
        self._exact("exact32", "f32", "f32", 1e-5, char_layer=True)

    def test_search_bf16(self):
        self._exact("exact16", "bf16", "bf16", 8e-3)

    # -- interleave -------------------------------------------------------------------
    def test_sentences_and_focus_gate(self):
        S = LexicalEncoder.sentences
        # an abbreviation or an initial does not end a sentence
        self.assertEqual(S("What did Dr. Dynzheis prescribe for a migraine?"),
                         ["What did Dr. Dynzheis prescribe for a migraine?"])
        self.assertEqual(len(S("Ask J. R. Smith. Then leave!")), 2)
        # a line ending in a capitalised word (an attribution) ends a unit; prose
        # wrapped mid-sentence does not
        self.assertEqual(S("Be brief.\n\t\t-- Warren H. Goldsmith\nThe Kerbax orchestra "
                           "is conducted by Klanrax Stirk."),
                         ["Be brief.", "-- Warren H. Goldsmith",
                          "The Kerbax orchestra is conducted by Klanrax Stirk."])
        self.assertEqual(S("The ledger was entrusted to\nTessa Quibble.\n\nNext one"),
                         ["The ledger was entrusted to Tessa Quibble.", "Next one"])
        enc = LexicalEncoder()
        q = "Where does the keeper of the Orvaline ledger live now?"
        ev = ["The Orvaline ledger was entrusted to Tessa Quibble.",
              "If you are given a take-home exam, you will forget where you live."]
        flat = lambda w: {x for win in w for x in win}          # noqa: E731
        full = flat(enc.interleave_windows(q, ev))
        self.assertTrue({"Tessa", "Quibble", "exam"} <= full)
        gated = flat(enc.interleave_windows(q, ev, relevance=[1.0, 0.6]))
        self.assertIn("Quibble", gated)
        self.assertNotIn("exam", gated)                         # a weak runner-up: no rows
        self.assertEqual(gated, flat(enc.interleave_windows(q, ev[:1])))
        with self.assertRaises(ValueError):
            enc.interleave_windows(q, ev, relevance=[1.0])

    def test_interleave_passes_relevance(self):
        seen = []

        class Rec(LexicalEncoder):
            def encode_interleave(self, question, evidence, relevance=None):
                seen.append((len(evidence), None if relevance is None else list(relevance)))
                return super().encode_interleave(question, evidence, relevance)

        with Memory(self.addr, "ilrel", Rec()) as m:
            m.add_many(FORTUNES[:100] or ["filler %d about keys" % i for i in range(100)])
            m.add("The spare key is under the blue flower pot.")
            r = m.interleave("where is the spare key?", max_rounds=3, k_per_round=2,
                             token_budget=4000, threshold=0.0)
        self.assertEqual(seen[0], (0, []))
        self.assertEqual(len(seen), len(r.trace))
        for n, rel in seen[1:]:
            self.assertEqual(len(rel), n)
            self.assertTrue(all(0 < x <= 1.0 + 1e-9 for x in rel))
            self.assertEqual(rel[0], 1.0)                       # a round's top note
        # the last round's query saw the notes read before it, each with its score /
        # the best score of the round that read it
        self.assertEqual(len(r.trace), 3)
        want = []
        for t in r.trace[:-1]:
            best = t["candidates"][0][1]
            want += [dict(t["candidates"])[i] / best for i in t["read"]]
        self.assertEqual(len(want), 4)
        np.testing.assert_allclose(seen[-1][1], want, atol=1e-4)

    def test_interleave_mechanics(self):
        with Memory(self.addr, "il", LexicalEncoder()) as m:
            a = m.add("The Orvaline ledger was entrusted to Tessa Quibble.")
            b = m.add("Tessa Quibble moved to a lighthouse outside Drumcairn last winter.")
            m.add_many(FORTUNES[:200] or ["filler %d" % i for i in range(200)])
            q = "Where does the keeper of the Orvaline ledger live now?"
            self.assertNotIn(b, [h.id for h in m.search(q, k=4)])
            r = m.interleave(q, max_rounds=3, k_per_round=1, token_budget=1000, threshold=0.05)
            self.assertEqual(r.ids[:2], [a, b])
            self.assertEqual(len(r.ids), len(set(r.ids)))
            self.assertEqual(r.trace[0]["read"], [a])
            self.assertEqual(r.trace[1]["read"], [b])
            for t in r.trace[1:]:
                self.assertNotIn(a, [i for i, _ in t["candidates"]])   # excluded once read
            self.assertIn("Drumcairn", r.context())
            # threshold: nothing scores above 0.99 -> no evidence
            r = m.interleave(q, threshold=0.99)
            self.assertEqual((r.ids, r.stop), ([], "threshold"))
            # budget: A has 9 words; a budget of 12 fits A only, B would overflow
            r = m.interleave(q, max_rounds=3, k_per_round=1, token_budget=12, threshold=0.05)
            self.assertEqual(r.ids[0], a)
            self.assertNotIn(b, r.ids)
            self.assertTrue(any(b in t["skipped"] for t in r.trace) or r.stop == "budget")

    # -- bounded evaluation on real text ----------------------------------------------
    @unittest.skipUnless(FORTUNES, "fortunes package absent (/usr/share/games/fortunes)")
    def test_eval_bounded(self):
        docs, questions = EV.corpus(1000, 30, 30, seed=1, fortunes=FORTUNES)
        with Memory(self.addr, "eval", LexicalEncoder()) as m:
            ids = m.add_many(docs, batch=250)
            ix = {i: j for j, i in enumerate(ids)}
            res = EV.evaluate(lambda q, k: [ix[i] for i, _ in m.route(q, k)[0]],
                              lambda q: [ix[i] for i in m.interleave(q, 3, 2, 2048, 0.05).ids],
                              questions)
        print("\nbounded eval (1000 docs, 30 single, 30 chains), lexical:",
              {k: round(v, 3) for k, v in res.items()})
        try:
            tf = EV.TfidfIndex(docs)
            r2 = EV.evaluate(lambda q, k: [i for i, _ in tf.search(q, k)],
                             lambda q: tf.interleave(q, 3, 2), questions)
            print("bounded eval, tf-idf baseline:", {k: round(v, 3) for k, v in r2.items()})
        except ImportError:
            print("tf-idf baseline skipped: python3-sklearn not installed")
        self.assertGreaterEqual(res["single_recall@5"], 0.95)
        self.assertGreaterEqual(res["single_recall@1"], 0.9)
        self.assertGreaterEqual(res["chain_search_A@6"], 0.9)
        self.assertGreaterEqual(res["chain_interleave_both"], 0.9)
        self.assertGreaterEqual(res["chain_interleave_both"], res["chain_search_both@6"] + 0.5)
        self.assertGreaterEqual(res["chain_interleave_both"], res["chain_search_both@10"] + 0.5)
        self.assertGreaterEqual(res["single_interleave_recall"], 0.9)


# ---- MSAEncoder: small random Qwen3 vs the model's own weights -----------------------

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    HAVE_TORCH = True
    WHY = ""
except Exception as e:  # ImportError, or a broken install
    HAVE_TORCH = False
    WHY = "torch/transformers not importable (%s): MSAEncoder untested here" % e


@unittest.skipUnless(HAVE_TORCH, WHY)
class MSAEncoderTest(unittest.TestCase):
    def test_pooled_keys_match_weights(self):
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
        from msa_memory.msa_encoder import MSAEncoder
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=257, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                          attn_implementation="eager")
        model = Qwen3ForCausalLM(cfg).float().eval()
        tok = lambda s: [b + 1 for b in s.encode()]   # noqa: E731  bytes as token ids
        P = 8
        enc = MSAEncoder(model, tok, layers=[1, 2], chunk_tokens=P, name="test-qwen3",
                         query_position_offset=16)
        texts = ["short", "a somewhat longer document of several chunks, " * 3]
        docs = enc.encode_documents(texts)
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        D = 16
        inv = 1.0 / (theta ** (np.arange(0, D, 2, dtype=np.float64) / D))

        def rope(x, pos):   # x [S, h, D] float64
            ang = np.outer(pos, inv)                       # [S, D/2]
            cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
            sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
            rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
            return x * cos + rot * sin

        def rms(x, w, eps):
            return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w

        def direct(text, offset):
            ids = torch.tensor([tok(text)])
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True,
                           position_ids=torch.arange(ids.shape[1])[None] + offset).hidden_states
            out = {}
            for l in enc.layers:
                lay = model.model.layers[l]
                at = lay.self_attn
                h = hs[l][0].double().numpy()
                x = rms(h, lay.input_layernorm.weight.detach().double().numpy(), cfg.rms_norm_eps)
                k = (x @ at.k_proj.weight.detach().double().numpy().T).reshape(len(h), 2, D)
                q = (x @ at.q_proj.weight.detach().double().numpy().T).reshape(len(h), 4, D)
                v = (x @ at.v_proj.weight.detach().double().numpy().T).reshape(len(h), 2, D)
                k = rms(k, at.k_norm.weight.detach().double().numpy(), cfg.rms_norm_eps)
                q = rms(q, at.q_norm.weight.detach().double().numpy(), cfg.rms_norm_eps)
                pos = np.arange(len(h)) + offset
                out[l] = (rope(k, pos), v, rope(q, pos))
            return out

        for t, d in zip(texts, docs):
            self.assertEqual(d.tokens, len(tok(t)))
            ref = direct(t, 0)                              # document-wise RoPE: from 0
            for l in enc.layers:
                k, v, _q = ref[l]
                C = math.ceil(len(k) / P)
                pk = np.stack([k[c * P:(c + 1) * P].mean(0) for c in range(C)])
                pv = np.stack([v[c * P:(c + 1) * P].mean(0) for c in range(C)])
                np.testing.assert_allclose(d.layers[l][0], pk, atol=2e-4, rtol=1e-3)
                np.testing.assert_allclose(d.layers[l][1], pv, atol=2e-4, rtol=1e-3)
                self.assertIsNone(d.layers[l][2])           # no router projections: route on K
        q = enc.encode_query("what is it?")
        ref = direct("what is it?", 16)                     # query positions start at k
        for l in enc.layers:
            np.testing.assert_allclose(q.layers[l][1], ref[l][2], atol=2e-4, rtol=1e-3)
            np.testing.assert_allclose(q.layers[l][0], ref[l][2], atol=2e-4, rtol=1e-3)
        self.assertFalse(enc.separate_router_keys)
        self.assertIn("test-qwen3", enc.identity)

    def test_router_projections_match_weights(self):
        """An MSA model (router K/Q projections, GQA): pooled K, V and router K of a
        document, and q / routing q of a query, against float64 from the weights."""
        import torch
        from msa_model import tiny_msa_model
        from msa_memory.msa_encoder import MSAEncoder
        m = tiny_msa_model(seed=3)
        lm, cfg = m.lm, m.lm.config
        P, D, H, HQ = 8, m.head_dim, m.kv_heads, m.query_heads
        tok = lambda s: [b + 1 for b in s.encode()]   # noqa: E731
        enc = MSAEncoder(lm, tok, layers=list(m.memory_layers), chunk_tokens=P, name="tiny-msa",
                         query_position_offset=4)
        self.assertTrue(enc.separate_router_keys)
        self.assertIn("router=r", enc.identity)
        text = "The Orvaline ledger was entrusted to Tessa Quibble in the spring. " * 2
        doc = enc.encode_documents([text])[0]
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        inv = 1.0 / (theta ** (np.arange(0, D, 2, dtype=np.float64) / D))

        def rope(x, pos):
            ang = np.outer(pos, inv)
            cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
            sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
            return x * cos + np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

        def rms(x, w, eps):
            return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w

        def direct(ids, offset):
            t = torch.tensor([ids])
            with torch.no_grad():
                hs = lm(input_ids=t, output_hidden_states=True,
                        position_ids=torch.arange(len(ids))[None] + offset).hidden_states
            out = {}
            pos = np.arange(len(ids)) + offset
            for l in m.memory_layers:
                lay = lm.model.layers[l]
                at = lay.self_attn
                W = lambda mod: mod.weight.detach().double().numpy().T   # noqa: E731
                x = rms(hs[l][0].double().numpy(), lay.input_layernorm.weight.detach().double().numpy(),
                        cfg.rms_norm_eps)
                k = rms((x @ W(at.k_proj)).reshape(-1, H, D), at.k_norm.weight.detach().double().numpy(), cfg.rms_norm_eps)
                q = rms((x @ W(at.q_proj)).reshape(-1, HQ, D), at.q_norm.weight.detach().double().numpy(), cfg.rms_norm_eps)
                out[l] = {"k": rope(k, pos), "q": rope(q, pos), "v": (x @ W(at.v_proj)).reshape(-1, H, D),
                          "rk": (x @ W(at.router_k_proj[0])).reshape(-1, H, D),
                          "rq": (x @ W(at.router_q_proj[0])).reshape(-1, HQ, D)}
            return out

        ids = tok(text)
        ref = direct(ids, 0)
        C = math.ceil(len(ids) / P)
        pool = lambda x: np.stack([x[c * P:(c + 1) * P].mean(0) for c in range(C)])   # noqa: E731
        for l in m.memory_layers:
            k, v, rk = doc.layers[l]
            for got, want, what in ((k, ref[l]["k"], "k"), (v, ref[l]["v"], "v"), (rk, ref[l]["rk"], "router_k")):
                np.testing.assert_allclose(got, pool(want), atol=3e-4, rtol=1e-3,
                                           err_msg="layer %d %s" % (l, what))
        qids = tok("who has the ledger?")
        q = enc.encode_query("who has the ledger?")
        ref = direct(qids, 4)
        for l in m.memory_layers:
            rq, qq = q.layers[l]
            np.testing.assert_allclose(qq, ref[l]["q"], atol=3e-4, rtol=1e-3)
            np.testing.assert_allclose(rq, ref[l]["rq"], atol=3e-4, rtol=1e-3)
        # The model's own encode path (msa_model, used to ingest for generation)
        # computes the same pooled latents as the hooks.
        n, lay = m.encode_document(text)
        self.assertEqual(n, len(ids))
        for l in m.memory_layers:
            for a, b in zip(lay[l], doc.layers[l]):
                np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    if not HAVE_TORCH:
        print("note: MSAEncoderTest will be skipped: " + WHY)
    unittest.main(verbosity=2)
