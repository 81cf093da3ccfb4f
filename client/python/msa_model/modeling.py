"""An MSA model (Qwen3 decoder layers + router K/Q projections) whose memory layers
ask a memory client for their memory, as the MSA reference does.

The model side of msad. Structure follows the reference architecture
(EverMind-AI/MSA, arXiv 2603.23516): every decoder layer is a Qwen3 layer; the
memory ("router") layers' attention also has ``router_k_proj`` / ``router_q_proj``
(``nn.Sequential(nn.Linear)``, the reference's parameter names, so an MSA
checkpoint's weights load as they are) and a ``memory_client``. Three stages:

* ``encode``: one document (or the chat-template prefix) alone, positions 0..N-1
  (document-wise RoPE), plain causal attention; the attention of every layer hands
  its K (after k_norm and RoPE), V and router K (router layers) to a capture dict.
* ``prefill``: the question, positions template_len.. . Every layer attends over
  ``[template | memory chunks | question (causal)]``. The template K/V come from
  ``memory_client.get_template_prefix_kvcaches(layer)`` (all layers). Router layers
  get the memory chunks from the memory client:
    - fetch mode (the reference's protocol): ``doc_query(routing_q [B,Hq,T,D],
      query_mask [B,T], layer) -> (k [H,C,D], v [H,C,D], scores [B,k], n_chunks [B],
      doc_ids [B,k])``, and the layer attends over the fetched chunks itself;
    - attend mode (``memory_client.mode == "attend"``): ``doc_attend(q, routing_q,
      query_mask, layer, scale, doc_ids=None) -> (out [B,Hq,T,D], lse [B,Hq,T],
      scores, doc_ids)`` -- the memory part is attended at the store, and merged with
      local attention over template + question by log-sum-exp.
* ``decode``: one token at a time; fetch mode attends over the prefill's cache
  (memory chunks included), attend mode calls ``doc_attend`` with the documents the
  prefill selected (``doc_ids``), so decoding reads the same memory.

Everything runs in the model's dtype; attention is computed explicitly (scores ->
softmax with log-sum-exp) so that both modes and the references share the
arithmetic of the local part.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, apply_rotary_pos_emb

__all__ = ["MSASettings", "MSAAttention", "MSAModel", "ByteTokenizer", "tiny_msa_model",
           "attention_with_lse", "merge_lse"]

# Reference names (config.msa_config) -> msad schema enums.
_REDUCE = {"mean": "mean", "max": "max", "last": "last"}


@dataclass(frozen=True)
class MSASettings:
    """The memory side of an MSA config: which layers route, P, k and the score
    reductions. Built from ``config.msa_config`` (the reference's keys)."""
    layers: tuple
    chunk_tokens: int = 64
    top_k: int = 16
    decouple_router: bool = True
    similarity: str = "cosine"        # INFONCE-trained routers compare normalised vectors
    head_reduce: str = "mean"
    query_reduce: str = "max"
    chunk_reduce: str = "max"

    @classmethod
    def from_config(cls, config):
        m = getattr(config, "msa_config", None)
        if not m:
            raise ValueError("config has no msa_config: not an MSA model (give settings)")
        get = m.get if isinstance(m, dict) else (lambda k, d=None: getattr(m, k, d))
        n = int(config.num_hidden_layers)
        rl = get("router_layer_idx", "all")
        layers = tuple(range(n)) if rl == "all" else tuple(int(i) for i in str(rl).split(","))
        aux = str(get("aux_loss_method", "INFONCE") or "").upper()
        return cls(layers=tuple(sorted(layers)),
                   chunk_tokens=int(get("pooling_kernel_size", 64)),
                   top_k=int(get("top_k_docs", 16)),
                   decouple_router=bool(get("decouple_router", True)),
                   similarity="cosine" if aux == "INFONCE" else "dot",
                   head_reduce=_REDUCE[str(get("head_reduce_method", "mean"))],
                   query_reduce=_REDUCE[str(get("query_reduce_method", "max"))],
                   chunk_reduce=_REDUCE[str(get("chunk_reduce_method", "max"))])

    def to_msa_config(self):
        return {"router_layer_idx": ",".join(map(str, self.layers)),
                "pooling_kernel_size": self.chunk_tokens, "top_k_docs": self.top_k,
                "decouple_router": self.decouple_router,
                "aux_loss_method": "INFONCE" if self.similarity == "cosine" else "NONE",
                "head_reduce_method": self.head_reduce,
                "query_reduce_method": self.query_reduce,
                "chunk_reduce_method": self.chunk_reduce}


def attention_with_lse(q, k, v, scale, mask=None):
    """q [B,Hq,T,D], k/v [B,H,S,D] (GQA: query head j reads kv head j // (Hq/H)),
    mask [T,S] bool (True = visible) or None. Returns out [B,Hq,T,D] and lse
    [B,Hq,T] (natural log; -inf for a row that sees nothing, with out = 0)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.matmul(p, v), lse


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Softmax-weighted merge of two attention parts over disjoint key sets
    (memory.proto's formula), stable for -inf on either side."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m)[..., None]
    wb = torch.exp(lse_b - m)[..., None]
    return (wa * out_a + wb * out_b) / (wa + wb)


@dataclass
class _State:
    stage: str                                   # encode | prefill | decode
    capture: dict = field(default_factory=dict)  # encode: layer -> (k, v, rk) [S, H, D]
    cache: dict = field(default_factory=dict)    # layer -> (K, V) [1, H, S, D] kept for decode
    selected: dict = field(default_factory=dict)  # layer -> (doc_ids [k], scores [k])


class MSAAttention(Qwen3Attention):
    """Qwen3 attention plus the MSA memory path. ``forward`` is Qwen3's own (so
    transformers' forward, hooks and MSAEncoder still work); ``msa_forward`` is the
    memory-aware path the MSA stages use."""

    def __init__(self, config, layer_idx, is_router_layer):
        super().__init__(config, layer_idx)
        self.is_router_layer = bool(is_router_layer)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.num_q_heads = int(config.num_attention_heads)
        if self.is_router_layer:
            self.router_k_proj = nn.Sequential(
                nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False))
            self.router_q_proj = nn.Sequential(
                nn.Linear(config.hidden_size, self.num_q_heads * self.head_dim, bias=False))
        self.memory_client = None

    def set_memory_client(self, memory_client):
        self.memory_client = memory_client

    def _qkv(self, x, cos, sin):
        B, S, _ = x.shape
        shp = (B, S, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shp)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shp)).transpose(1, 2)
        v = self.v_proj(x).view(shp).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def msa_forward(self, x, position_embeddings, state):
        B, S, _ = x.shape
        cos, sin = position_embeddings
        q, k, v = self._qkv(x, cos, sin)
        mc = self.memory_client
        L = self.layer_idx
        if state.stage == "encode":
            rk = None
            if self.is_router_layer:
                rk = self.router_k_proj(x).view(B, S, -1, self.head_dim)[0]
            state.capture[L] = (k[0].transpose(0, 1), v[0].transpose(0, 1), rk)
            # Documents can be long: the fused kernel, no [S, S] score matrix.
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
        elif state.stage == "prefill":
            if mc is None:
                raise RuntimeError("layer %d: prefill needs a memory client" % L)
            tk, tv = mc.get_template_prefix_kvcaches(L)        # [1, H, Lt, D]
            tk, tv = tk.to(k.dtype), tv.to(v.dtype)
            Lt = tk.shape[2]
            mode = getattr(mc, "mode", "fetch")
            mem_k = mem_v = None
            if self.is_router_layer:
                rq = self.router_q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
                qmask = torch.ones(B, S, dtype=torch.bool, device=x.device)
                if mode == "attend":
                    out_m, lse_m, scores, ids = mc.doc_attend(q, rq, qmask, L, self.scaling)
                else:
                    mem_k, mem_v, scores, _n, ids = mc.doc_query(rq, qmask, L)
                    mem_k = mem_k.to(k.dtype).unsqueeze(0)     # [1, H, C, D]
                    mem_v = mem_v.to(v.dtype).unsqueeze(0)
                state.selected[L] = (ids, scores)
            C = 0 if mem_k is None else mem_k.shape[2]
            parts_k = [tk] + ([mem_k] if C else []) + [k]
            parts_v = [tv] + ([mem_v] if C else []) + [v]
            K, V = torch.cat(parts_k, 2), torch.cat(parts_v, 2)
            mask = torch.ones(S, Lt + C + S, dtype=torch.bool, device=x.device)
            mask[:, Lt + C:] = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            out, lse = attention_with_lse(q, K, V, self.scaling, mask)
            if self.is_router_layer and mode == "attend":
                out = merge_lse(out_m.to(out.dtype), lse_m.to(lse.dtype), out, lse)
            state.cache[L] = (K, V)
        elif state.stage == "decode":
            K, V = state.cache[L]
            K, V = torch.cat([K, k], 2), torch.cat([V, v], 2)
            state.cache[L] = (K, V)
            out, lse = attention_with_lse(q, K, V, self.scaling)
            if self.is_router_layer and getattr(mc, "mode", "fetch") == "attend":
                ids = state.selected[L][0]
                out_m, lse_m, _s, _ids = mc.doc_attend(q, None, None, L, self.scaling, doc_ids=ids)
                out = merge_lse(out_m.to(out.dtype), lse_m.to(lse.dtype), out, lse)
        else:
            raise ValueError("unknown stage %r" % state.stage)
        out = out.transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out)


class ByteTokenizer:
    """Bytes as token ids (1..256; 0 = pad): the tokenizer of the tiny random model,
    so tests need no download."""
    vocab_size = 257
    eos_token_id = None

    def encode(self, text):
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(max(0, min(255, int(i) - 1)) for i in ids if int(i) > 0).decode(
            "utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, tk):
        self.tk = tk
        self.eos_token_id = getattr(tk, "eos_token_id", None)

    def encode(self, text):
        return [int(t) for t in self.tk(text, add_special_tokens=False)["input_ids"]]

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=True)


class MSAModel:
    """A causal LM (transformers Qwen3ForCausalLM) whose attention modules are
    MSAAttention, driven stage by stage. ``settings`` say which layers route."""

    def __init__(self, lm, tokenizer, settings, name="msa-model", template=""):
        self.lm = lm.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name
        self.template = template
        self.config = lm.config
        base = lm.model
        self._layers = base.layers
        for i, layer in enumerate(self._layers):
            if not isinstance(layer.self_attn, MSAAttention):
                old = layer.self_attn
                new = MSAAttention(self.config, i, i in settings.layers)
                p = next(old.parameters())
                new.to(device=p.device, dtype=p.dtype)
                missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
                if unexpected or any(not m.startswith("router_") for m in missing):
                    raise ValueError("layer %d: attention weights do not map onto MSAAttention "
                                     "(missing %s, unexpected %s)" % (i, missing, unexpected))
                layer.self_attn = new
        self.memory_layers = tuple(settings.layers)
        for l in self.memory_layers:
            if not 0 <= l < len(self._layers):
                raise ValueError("msa layers: %d not in 0..%d" % (l, len(self._layers) - 1))
        cfg = self.config
        self.num_layers = len(self._layers)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.query_heads = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, settings=None, dtype=None, device="cpu", template=""):
        """A Qwen3-family or MSA checkpoint from the user's disk (never downloaded:
        local_files_only). MSA checkpoints carry msa_config; for a plain Qwen3
        checkpoint give ``settings`` (its router projections start random: routing
        then compares random projections, useful only to exercise the system)."""
        from transformers import AutoConfig, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
        import json
        import os
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        msa_cfg = raw.pop("msa_config", None)
        if raw.get("model_type") in ("msa", "qwen3"):
            raw["model_type"] = "qwen3"
            cfg = Qwen3Config.from_dict(raw)
        else:
            cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        if msa_cfg is not None:
            cfg.msa_config = msa_cfg
        settings = settings or MSASettings.from_config(cfg)
        cfg.msa_config = settings.to_msa_config()
        lm = Qwen3ForCausalLM(cfg)
        m = cls(lm, None, settings, name=os.path.abspath(path), template=template)
        from safetensors.torch import load_file
        state = {}
        for fn in sorted(os.listdir(path)):
            if fn.endswith(".safetensors"):
                state.update(load_file(os.path.join(path, fn)))
        if not state:
            raise FileNotFoundError("%s: no *.safetensors weights" % path)
        missing, unexpected = lm.load_state_dict(state, strict=False)
        missing = [k for k in missing if "router_" not in k and k != "lm_head.weight"]
        if missing:
            raise ValueError("%s: weights missing for %s" % (path, missing[:8]))
        if "lm_head.weight" not in state:
            lm.tie_weights()
        lm.to(device=device, dtype=dtype or torch.float32)
        m.tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
        return m

    # -- the decoder stack -------------------------------------------------------------
    def _device(self):
        return next(self.lm.parameters()).device

    def _run(self, ids, start, state):
        """Token ids (list) at positions start.. -> logits [S, vocab] (float32)."""
        dev = self._device()
        x = torch.as_tensor([ids], dtype=torch.long, device=dev)
        pos = torch.arange(start, start + len(ids), device=dev)[None]
        base = self.lm.model
        h = base.embed_tokens(x)
        pe = base.rotary_emb(h, pos)
        for layer in self._layers:
            r = h
            h = r + layer.self_attn.msa_forward(layer.input_layernorm(h), pe, state)
            r = h
            h = r + layer.mlp(layer.post_attention_layernorm(h))
        h = base.norm(h)
        return self.lm.lm_head(h)[0].float()

    def to(self, dtype=None, device=None):
        self.lm.to(device=device, dtype=dtype)
        return self

    def set_memory_client(self, mc):
        for layer in self._layers:
            layer.self_attn.set_memory_client(mc)

    # -- encoding ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_tokens(self, ids):
        """One sequence alone at positions 0..N-1. Returns {layer: (k, v, rk or None)}
        token rows float32 [N, H, D] for EVERY layer (rk: router layers only)."""
        st = _State("encode")
        self._run(list(ids), 0, st)
        return {l: tuple(None if t is None else t.float() for t in c) for l, c in st.capture.items()}

    def template_ids(self):
        return self.tokenizer.encode(self.template) if self.template else []

    def pool(self, rows):
        """[N, H, D] -> float32 numpy [ceil(N/P), H, D], the mean per chunk of P."""
        x = rows.double()
        P = self.settings.chunk_tokens
        C = -(-x.shape[0] // P)
        return np.stack([x[c * P:(c + 1) * P].mean(0).numpy() for c in range(C)]).astype(np.float32)

    def encode_document(self, text=None, ids=None):
        """A document's pooled memory: (tokens, {layer: (k, v, rk)} float32 [C, H, D])
        for the memory layers (rk None without a decoupled router)."""
        ids = ids if ids is not None else self.tokenizer.encode(text)
        if not ids:
            raise ValueError("document: empty (no tokens)")
        cap = self.encode_tokens(ids)
        out = {}
        for l in self.memory_layers:
            k, v, rk = cap[l]
            out[l] = (self.pool(k), self.pool(v),
                      self.pool(rk) if (rk is not None and self.settings.decouple_router) else None)
        return len(ids), out

    # -- generation --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, question, memory_client, max_new_tokens=32, eos_token_id=None):
        """Greedy generation with memory. question: text or token ids. Returns a dict:
        tokens (generated ids), text, logits (list of float32 [vocab] per generated
        token, the first from the prefill), selected {layer: (doc_ids, scores)}."""
        ids = self.tokenizer.encode(question) if isinstance(question, str) else list(question)
        if not ids:
            raise ValueError("question: empty (no tokens)")
        self.set_memory_client(memory_client)
        eos = eos_token_id if eos_token_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        Lt = memory_client.template_tokens()
        pin = getattr(memory_client, "pinned", None)
        with (pin() if pin else _nullcontext()):
            st = _State("prefill")
            logits = self._run(ids, Lt, st)[-1]
            out_logits = [logits]
            tokens = []
            st.stage = "decode"
            pos = Lt + len(ids)
            for i in range(max_new_tokens):
                t = int(torch.argmax(logits))
                tokens.append(t)
                if eos is not None and t == eos or i == max_new_tokens - 1:
                    break
                logits = self._run([t], pos, st)[-1]
                out_logits.append(logits)
                pos += 1
        sel = {l: (np.asarray(d).reshape(-1), np.asarray(s, dtype=np.float32).reshape(-1))
               for l, (d, s) in st.selected.items()}
        return {"tokens": tokens, "text": self.tokenizer.decode(tokens), "logits": out_logits,
                "selected": sel}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def tiny_msa_model(seed=0, layers=4, memory_layers=(1, 2, 3), hidden=64, heads=4, kv_heads=2,
                   head_dim=16, chunk_tokens=8, top_k=4, query_reduce="max",
                   template="<|sys|>You answer from memory.<|user|>", init_scale=2.0,
                   dtype=torch.float32):
    """A small randomly initialised MSA model (Qwen3 layers, GQA, router projections)
    with the byte tokenizer: no download, deterministic for a seed. Matrices are drawn
    N(0, init_scale^2 / fan_in): at 2.0 greedy decoding varies (at transformers'
    default init it repeats one token) and top-2 logit margins stay well above
    float32 noise, so token-by-token parity tests have power."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    settings = MSASettings(layers=tuple(memory_layers), chunk_tokens=chunk_tokens, top_k=top_k,
                           query_reduce=query_reduce)
    cfg = Qwen3Config(vocab_size=ByteTokenizer.vocab_size, hidden_size=hidden,
                      intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                      attn_implementation="eager")
    cfg.msa_config = settings.to_msa_config()
    torch.manual_seed(seed)
    lm = Qwen3ForCausalLM(cfg)
    m = MSAModel(lm, ByteTokenizer(), settings, name="tiny-msa-seed%d" % seed, template=template)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (init_scale / math.sqrt(p.shape[1])))
    return m.to(dtype)

