"""msa_memory: agent long-term memory on msad (Python).

    from msa_memory import Memory, LexicalEncoder
    mem = Memory("127.0.0.1:7420", "notes", LexicalEncoder())
    nid = mem.add("Ada's locker code is 4711.")
    mem.search("locker code", k=3)           # [Hit(id, score, text, metadata)]
    mem.interleave("...", max_rounds=3)      # MSA Memory Interleave

Encoders: LexicalEncoder (a deterministic, model-free lexical baseline -- not MSA)
and MSAEncoder (msa_memory.msa_encoder; needs torch + transformers, imported only
when used). Needs msa_client (build/python: PYTHONPATH=build/python).
"""
from .encoders import Encoder, EncodedDoc, EncodedQuery, LexicalEncoder, pool_chunks  # noqa: F401
from .memory import Hit, InterleaveResult, Memory, MemoryError_, ModelMismatch, fuse  # noqa: F401


def MSAEncoder(*args, **kw):
    """msa_memory.msa_encoder.MSAEncoder (imports torch and transformers)."""
    from .msa_encoder import MSAEncoder as _E
    return _E(*args, **kw)


__all__ = ["Memory", "Hit", "InterleaveResult", "MemoryError_", "ModelMismatch", "fuse",
           "Encoder", "EncodedDoc", "EncodedQuery", "LexicalEncoder", "MSAEncoder",
           "pool_chunks"]
