"""msa_model: an MSA language model whose memory lives in msad.

    from msa_model import tiny_msa_model, MsadMemoryClient
    model = tiny_msa_model(seed=0)                 # or MSAModel.from_pretrained(path)
    mem = MsadMemoryClient("127.0.0.1:7420", "notes", model, mode="fetch").create()
    mem.add({1: "The Orvaline ledger is kept by Tessa Quibble."})
    out = model.generate("Who keeps the Orvaline ledger?", mem, max_new_tokens=32)
    out["text"], out["selected"]                   # {layer: (doc_ids, scores)}

modeling: the model (Qwen3 layers + MSA router projections, stages encode /
prefill / decode, fetch and attend modes). memory_client: the memory-client
protocol of the MSA reference over msad. demo: ``python -m msa_model.demo``.
"""

from .modeling import (  # noqa: F401
    ByteTokenizer, MSAAttention, MSAModel, MSASettings, attention_with_lse, merge_lse,
    tiny_msa_model,
)
from .memory_client import MemoryUnavailable, MsadMemoryClient, model_identity  # noqa: F401
