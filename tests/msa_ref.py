"""The reference memory of an MSA model, held in process (tests and benchmarks).

Written independently of msa_model.MsadMemoryClient: the model's own token K/V and
router K pooled per chunk in torch float64, routing by SEMANTICS.md in float64
(COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX; ties to the smaller id), top-k by sort.
It speaks the MSA reference's memory-client protocol (fetch mode).
"""
import torch

__all__ = ["InProcessMemory"]


class InProcessMemory:
    """The reference memory: pooled K/V in torch, routing and top-k in torch float64."""
    mode = "fetch"

    def __init__(self, model):
        self.model = model
        s = model.settings
        self.P, self.k = s.chunk_tokens, s.top_k
        self.docs = {}
        ids = model.template_ids()
        cap = model.encode_tokens(ids) if ids else None
        H, D = model.kv_heads, model.head_dim
        self.template = {l: (cap[l][0], cap[l][1]) if cap else (torch.zeros(0, H, D),) * 2
                         for l in range(model.num_layers)}
        self.n_template = len(ids)

    def _pool(self, x):
        x = x.double()
        C = -(-x.shape[0] // self.P)
        return torch.stack([x[c * self.P:(c + 1) * self.P].mean(0) for c in range(C)]).float()

    def put(self, doc_id, text):
        cap = self.model.encode_tokens(self.model.tokenizer.encode(text))
        self.docs[doc_id] = {l: (self._pool(cap[l][0]), self._pool(cap[l][1]), self._pool(cap[l][2]))
                             for l in self.model.memory_layers}

    def delete(self, doc_id):
        del self.docs[doc_id]

    def template_tokens(self):
        return self.n_template

    def get_template_prefix_kvcaches(self, layer):
        k, v = self.template[layer]
        return k.transpose(0, 1)[None].clone(), v.transpose(0, 1)[None].clone()

    def scores(self, rq, layer):
        """rq [T, Hq, D] -> {doc: float64 score}."""
        q = rq.double()
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        G = q.shape[1] // self.model.kv_heads
        out = {}
        for d, layers in self.docs.items():
            rk = layers[layer][2].double()                        # [C, H, D]
            rk = rk / rk.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            rk = rk.repeat_interleave(G, dim=1)                   # [C, Hq, D]
            s = torch.einsum("tjd,cjd->tjc", q, rk).mean(1)        # head mean -> [T, C]
            out[d] = float(s.max(0).values.max())                 # query max, chunk max
        return out

    def doc_query(self, routing_q, query_mask, layer):
        rq = routing_q[0].transpose(0, 1)[query_mask[0]]
        sc = self.scores(rq, layer)
        ids = sorted(sc, key=lambda d: (-sc[d], d))[:self.k]
        H, D = self.model.kv_heads, self.model.head_dim
        K = torch.cat([torch.zeros(0, H, D)] + [self.docs[d][layer][0] for d in ids]).transpose(0, 1)
        V = torch.cat([torch.zeros(0, H, D)] + [self.docs[d][layer][1] for d in ids]).transpose(0, 1)
        self.last_scores = (layer, sc)
        return (K, V, torch.tensor([[sc[d] for d in ids]], dtype=torch.float32).reshape(1, -1),
                torch.tensor([K.shape[1]]), torch.tensor([ids], dtype=torch.long).reshape(1, -1))
