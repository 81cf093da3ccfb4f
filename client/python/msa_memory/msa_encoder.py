"""MSAEncoder: latents of a Qwen3-family or MSA checkpoint (Hugging Face transformers).

Tested in ./ops/test (tests/test_memory.py MSAEncoderTest, on CPU): a small random
Qwen3, and a small random MSA model with router K/Q projections, against a float64
computation from the weights.

What it computes, per memory layer l (``layers``, default: the upper half of the
model's decoder layers, where MSA puts its memory):

  * documents: each document is run through the model ALONE with position ids
    0 .. N-1 (MSA's document-wise RoPE: every document starts at position 0).
    Forward hooks on the layer's attention capture
      - K: the key projection after the per-head norm (Qwen3's ``k_norm``; none in
        Llama-style models) and after RoPE -- applied here with the (cos, sin) the
        model itself passed to that attention call (``position_embeddings``), so the
        keys are exactly those the model attends with;
      - V: the value projection (no norm, no RoPE);
      - router K: the checkpoint's router key projection when the attention module
        has one (an attribute named in ``router_k_names``), applied to the
        attention's input (no norm, no RoPE: routing compares content, positions
        differ per document); else the collection routes on K
        (``separate_router_keys = False``).
    Token rows are mean-pooled per chunk of P tokens in float32 (SEMANTICS.md
    "Pooling"); the pooled rows are sent (Document.raw = false).
  * queries: position ids start at ``query_position_offset`` (MSA: k, the number of
    memory documents the query attends over; default the collection's top_k = 16).
    Hooks capture q (after q_norm and RoPE) and routing_q (the router query
    projection when present, else q), [T, Hq, D].

Identity: "<name_or_path>@<revision or 'local'>:layers=..:P=..:router=k|r", so that
latents of another checkpoint, layer set, P or routing source are refused by msad.
"""

import numpy as np

from .encoders import EncodedDoc, EncodedQuery, Encoder, pool_chunks

__all__ = ["MSAEncoder"]

ROUTER_K_NAMES = ("router_k_proj", "k_router_proj", "router_k", "route_k_proj", "memory_k_proj")
ROUTER_Q_NAMES = ("router_q_proj", "q_router_proj", "router_q", "route_q_proj", "memory_q_proj")


def _rotate_half(x):
    h = x.shape[-1] // 2
    import torch
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _apply_rope(x, cos, sin):
    """x [B, S, H, D]; cos/sin [B, S, D] as the model's rotary embedding returns them."""
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class MSAEncoder(Encoder):
    """model: a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...))
    or its base model; tokenizer: a transformers tokenizer or any callable text ->
    list of token ids. layers: memory layer indices (default: upper half).
    chunk_tokens: P (64 in the paper). name/revision: for the identity (default:
    model.config._name_or_path and 'local'). batch_tokens: documents are batched
    (right-padded) up to about this many tokens per forward. max_doc_tokens: longer
    documents are truncated (the count sent is the truncated one).
    """

    def __init__(self, model, tokenizer, layers=None, chunk_tokens=64, name=None, revision=None,
                 query_position_offset=None, default_top_k=16, kv_dtype="bf16",
                 routing_dtype="bf16", batch_tokens=16384, max_doc_tokens=32768,
                 router_k_names=ROUTER_K_NAMES, router_q_names=ROUTER_Q_NAMES,
                 similarity="cosine", head_reduce="mean", query_reduce="max", chunk_reduce="max"):
        import torch  # noqa: F401  (fail early and clearly when absent)
        self.model = model.eval()
        self.tokenizer = tokenizer
        base = getattr(model, "model", model)
        self._decoder_layers = base.layers
        cfg = model.config
        n_layers = len(self._decoder_layers)
        self.layers = tuple(sorted(layers if layers is not None
                                   else range(n_layers // 2, n_layers)))
        if not self.layers or self.layers[0] < 0 or self.layers[-1] >= n_layers:
            raise ValueError("layers must be in 0..%d" % (n_layers - 1))
        self.query_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.query_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.query_heads)
        self.chunk_tokens = int(chunk_tokens)
        self.default_top_k = int(default_top_k)
        self.query_position_offset = int(self.default_top_k if query_position_offset is None
                                         else query_position_offset)
        self.kv_dtype, self.routing_dtype = kv_dtype, routing_dtype
        self.similarity, self.head_reduce = similarity, head_reduce
        self.query_reduce, self.chunk_reduce = query_reduce, chunk_reduce
        self.batch_tokens = int(batch_tokens)
        self.max_doc_tokens = int(max_doc_tokens)
        attn0 = self._decoder_layers[self.layers[0]].self_attn
        self._rk_name = next((n for n in router_k_names if hasattr(attn0, n)), None)
        self._rq_name = next((n for n in router_q_names if hasattr(attn0, n)), None)
        self.separate_router_keys = self._rk_name is not None
        name = name or getattr(cfg, "_name_or_path", "") or type(model).__name__
        self.identity = "%s@%s:layers=%s:P=%d:router=%s:qpos=%d" % (
            name, revision or "local", ",".join(map(str, self.layers)), self.chunk_tokens,
            "r" if self.separate_router_keys else "k", self.query_position_offset)
        self._cap = None
        self._hooks = []
        self._install()

    # -- hooks -------------------------------------------------------------------------
    def _install(self):
        for l in self.layers:
            attn = self._decoder_layers[l].self_attn

            def pre(mod, args, kwargs, l=l):
                if self._cap is not None:
                    pe = kwargs.get("position_embeddings")
                    if pe is None and len(args) > 1:
                        pe = args[1]
                    self._cap[l]["pe"] = pe
                    x = kwargs.get("hidden_states")
                    self._cap[l]["x"] = (args[0] if x is None and args else x).detach()
                return None

            self._hooks.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            k_mod = getattr(attn, "k_norm", None) or attn.k_proj
            q_mod = getattr(attn, "q_norm", None) or attn.q_proj
            self._hooks.append(k_mod.register_forward_hook(self._saver(l, "k")))
            self._hooks.append(q_mod.register_forward_hook(self._saver(l, "q")))
            self._hooks.append(attn.v_proj.register_forward_hook(self._saver(l, "v")))
            # Router projections: a plain transformers forward never calls them (the
            # MSA reference does only in its own prefill stages), so _run applies
            # them to the attention's input captured above.

    def _saver(self, l, key):
        def hook(mod, inp, out):
            if self._cap is not None:
                self._cap[l][key] = out.detach()
        return hook

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _heads(self, x, n):
        """[B, S, n*D] or [B, S, n, D] -> [B, S, n, D] float32."""
        if x.dim() == 3:
            x = x.view(x.shape[0], x.shape[1], n, self.head_dim)
        return x.float()

    def _run(self, id_lists, offset):
        """Forward over a right-padded batch with positions offset..offset+n-1 per row;
        returns {layer: {"k","v","q","rk","rq": float32 [B, S, heads, D]}}."""
        import torch
        dev = next(self.model.parameters()).device
        S = max(len(x) for x in id_lists)
        B = len(id_lists)
        ids = torch.zeros((B, S), dtype=torch.long, device=dev)
        mask = torch.zeros((B, S), dtype=torch.long, device=dev)
        for b, x in enumerate(id_lists):
            ids[b, :len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[b, :len(x)] = 1
        pos = (torch.arange(S, device=dev) + offset).unsqueeze(0).expand(B, S)
        self._cap = {l: {} for l in self.layers}
        try:
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            out = {}
            for l in self.layers:
                c = self._cap[l]
                cos, sin = c["pe"]
                k = _apply_rope(self._heads(c["k"], self.kv_heads), cos.float(), sin.float())
                q = _apply_rope(self._heads(c["q"], self.query_heads), cos.float(), sin.float())
                o = {"k": k, "q": q, "v": self._heads(c["v"], self.kv_heads)}
                attn = self._decoder_layers[l].self_attn
                if self._rk_name:
                    o["rk"] = self._heads(getattr(attn, self._rk_name)(c["x"]).detach(), self.kv_heads)
                if self._rq_name:
                    o["rq"] = self._heads(getattr(attn, self._rq_name)(c["x"]).detach(), self.query_heads)
                out[l] = o
            return out
        finally:
            self._cap = None

    # -- the interface -----------------------------------------------------------------
    def tokenize(self, text):
        """Token ids: a transformers tokenizer (no special tokens added), else any
        callable text -> ids, else an object with .encode(text)."""
        tk = self.tokenizer
        if hasattr(tk, "model_max_length") or hasattr(tk, "pad_token"):
            return [int(t) for t in tk(text, add_special_tokens=False)["input_ids"]]
        if callable(tk):
            return [int(t) for t in tk(text)]
        return [int(t) for t in tk.encode(text)]

    def count_tokens(self, text):
        return len(self.tokenize(text))

    def encode_documents(self, texts):
        toks = [self.tokenize(t)[:self.max_doc_tokens] or [0] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(toks[i]))
        out = [None] * len(texts)
        P = self.chunk_tokens
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j - i + 1) * len(toks[order[j]]) <= self.batch_tokens:
                j += 1
            group = order[i:j]
            caps = self._run([toks[g] for g in group], 0)   # document-wise RoPE: from 0
            for b, g in enumerate(group):
                n = len(toks[g])
                layers = {}
                for l in self.layers:
                    c = caps[l]
                    k = pool_chunks(c["k"][b, :n].cpu().numpy(), P)
                    v = pool_chunks(c["v"][b, :n].cpu().numpy(), P)
                    rk = pool_chunks(c["rk"][b, :n].cpu().numpy(), P) if "rk" in c else None
                    layers[l] = (k, v, rk)
                out[g] = EncodedDoc(n, layers)
            i = j
        return out

    def encode_query(self, text):
        ids = self.tokenize(text) or [0]
        caps = self._run([ids], self.query_position_offset)
        layers = {}
        for l in self.layers:
            c = caps[l]
            q = c["q"][0].cpu().numpy().astype(np.float32)
            rq = c["rq"][0].cpu().numpy().astype(np.float32) if "rq" in c else q
            layers[l] = (rq, q)
        return EncodedQuery(len(ids), layers)
