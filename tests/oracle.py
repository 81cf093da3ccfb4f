"""oracle.py — an independent NumPy reference of msad's API semantics.

Written from docs/SEMANTICS.md and rpc/memory.proto only (not from msad's C
code), so that engine tests compare two implementations of one contract.

What it models:
  * dtypes: F32, F16 (IEEE, via numpy float16), BF16 (round-to-nearest-even done
    here with integer bit operations), I8 (per-(row, head) symmetric scale);
  * pooling of raw writes: float32 mean per chunk, then rounded once to the
    stored dtype;
  * routing with every schema option (COSINE/DOT, HEAD_MEAN/MAX,
    QUERY_MAX/MEAN/LAST, CHUNK_MAX/MEAN, exclude_ids, ties by smaller id, top_k),
    with scores in float64 from the keys as stored (for I8 too: the I8 index
    only picks candidates, msad re-scores them from the stored keys);
  * attention with scale, lse and out dtype;
  * a store: collections, documents with versions and seqs, CAS rules,
    deletes, multi-op requests applied all-or-nothing, commit_seq.

Validation is modelled only as far as the tests need to predict a code for a
request with one fault; the tests pick single-fault requests.

Decisions where SEMANTICS is silent (tests/test_engine.py states them too):
  * Write tensors may come in any of F32/F16/BF16; the server rounds them to the
    stored dtype (kv_dtype for K/V, the router store dtype for router_k).
  * The routing index holds COSINE keys normalised and then rounded to
    routing_dtype (F16/BF16), or quantised from the normalised key for I8
    (DESIGN.md "normalised at insert"). Set Oracle.index_round = False to model
    an index that keeps normalised keys in float32 instead; the difference is
    far inside the test tolerances.
  * I8 quantisation rounds half away from zero: q = round(x / s), s = max|x|/127.
  * I8 routing returns the scores of the stored keys (kv_dtype): the quantised
    index finds 4 x top_k (at least top_k + 16) candidates and msad re-scores
    them in float32 from the stored router keys. Set Oracle.i8_rerank = False
    to model scores of the quantised keys instead.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

# ---- dtypes -------------------------------------------------------------------

DTYPE_UNSPECIFIED, F32, F16, BF16, I8 = 0, 1, 2, 3, 4
DTYPE_NAMES = {0: "DTYPE_UNSPECIFIED", 1: "F32", 2: "F16", 3: "BF16", 4: "I8"}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
DTYPE_SIZE = {F32: 4, F16: 2, BF16: 2, I8: 1}

COSINE, DOT = 0, 1
HEAD_MEAN, HEAD_MAX = 0, 1
QUERY_MAX, QUERY_MEAN, QUERY_LAST = 0, 1, 2
CHUNK_MAX, CHUNK_MEAN = 0, 1
ENUM_NAMES = {
    "similarity": ["COSINE", "DOT"],
    "head_reduce": ["HEAD_MEAN", "HEAD_MAX"],
    "query_reduce": ["QUERY_MAX", "QUERY_MEAN", "QUERY_LAST"],
    "chunk_reduce": ["CHUNK_MAX", "CHUNK_MEAN"],
}

ID_MAX = (1 << 63) - 1


def f32_to_bf16_bits(x) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even, NaN kept."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    lsb = (u >> 16) & 1
    r = ((u + 0x7FFF + lsb) >> 16) & 0xFFFF
    r = np.where(nan, ((u >> 16) | 0x40) & 0xFFFF, r)
    return r.astype(np.uint16)


def bf16_bits_to_f32(b) -> np.ndarray:
    b = np.asarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_to(dtype: int, x) -> np.ndarray:
    """Values of x (float32) after rounding to dtype, as float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == F32:
        return x.copy()
    if dtype == F16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == BF16:
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    raise ValueError(f"round_to: dtype {dtype}")


def encode(dtype: int, x) -> np.ndarray:
    """float values -> the array a .npy of that dtype holds (bf16 as uint16 bits)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == F32:
        return x.copy()
    if dtype == F16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    if dtype == BF16:
        return f32_to_bf16_bits(x)
    if dtype == I8:
        return np.asarray(x).astype(np.int8)
    raise ValueError(f"encode: dtype {dtype}")


def decode(dtype: int, a) -> np.ndarray:
    """An array as stored in .npy for dtype -> float32 values."""
    a = np.asarray(a)
    if dtype == F32:
        return a.astype(np.float32)
    if dtype == F16:
        return a.astype(np.float16).astype(np.float32)
    if dtype == BF16:
        return bf16_bits_to_f32(a.astype(np.uint16))
    if dtype == I8:
        return a.astype(np.float32)
    raise ValueError(f"decode: dtype {dtype}")


def dtype_of_npy(a: np.ndarray) -> int:
    """The msad dtype a .npy array stands for (see client/npy.h)."""
    return {np.dtype("<f4"): F32, np.dtype("<f2"): F16, np.dtype("<u2"): BF16,
            np.dtype("i1"): I8}[a.dtype]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Per last-axis vector, float64; zero vectors stay zero."""
    x = np.asarray(x, dtype=np.float64)
    n = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return np.where(n > 0, x / np.where(n > 0, n, 1.0), 0.0)


def quantize_i8(x: np.ndarray):
    """x [..., D] float -> (q int8 [..., D], scale [..., 1]); per vector, half away from 0."""
    x = np.asarray(x, dtype=np.float32)
    s = (np.max(np.abs(x), axis=-1, keepdims=True) / np.float32(127.0)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1.0))
    y = (x / safe).astype(np.float32)
    q = np.sign(y) * np.floor(np.abs(y) + np.float32(0.5))
    q = np.clip(q, -127, 127)
    q = np.where(s > 0, q, 0).astype(np.int8)
    return q, s


def pool(raw: np.ndarray, P: int) -> np.ndarray:
    """raw [N, H, D] float32 -> [ceil(N/P), H, D] float32 means.

    SEMANTICS: the float32 mean of the chunk's tokens. Summed token by token in
    float32 (the natural reading), then divided by the count in float32."""
    raw = np.asarray(raw, dtype=np.float32)
    N = raw.shape[0]
    C = -(-N // P)
    out = np.zeros((C,) + raw.shape[1:], dtype=np.float32)
    for c in range(C):
        t0, t1 = c * P, min((c + 1) * P, N)
        acc = np.zeros(raw.shape[1:], dtype=np.float32)
        for t in range(t0, t1):
            acc += raw[t]
        out[c] = acc / np.float32(t1 - t0)
    return out


# ---- schema -------------------------------------------------------------------

@dataclass
class Schema:
    layers: List[int]
    kv_heads: int
    query_heads: int
    head_dim: int
    chunk_tokens: int
    kv_dtype: int = BF16
    routing_dtype: int = BF16
    separate_router_keys: bool = False
    similarity: int = COSINE
    head_reduce: int = HEAD_MEAN
    query_reduce: int = QUERY_MAX
    chunk_reduce: int = CHUNK_MAX
    default_top_k: int = 16
    model: str = ""

    def with_defaults(self) -> "Schema":
        s = copy.deepcopy(self)
        if s.kv_dtype == 0:
            s.kv_dtype = BF16
        if s.routing_dtype == 0:
            s.routing_dtype = BF16
        if s.default_top_k == 0:
            s.default_top_k = 16
        return s

    @property
    def router_store_dtype(self) -> int:
        return self.kv_dtype if self.routing_dtype == I8 else self.routing_dtype

    def validate(self) -> Optional[str]:
        """Returns the field at fault (as in 'schema.<field>'), or None."""
        s = self
        if not s.layers or len(s.layers) > 256:
            return "layers"
        if any(b <= a for a, b in zip(s.layers, s.layers[1:])):
            return "layers"
        if not 1 <= s.kv_heads <= 64:
            return "kv_heads"
        if not 1 <= s.query_heads <= 256 or s.query_heads % s.kv_heads:
            return "query_heads"
        if not 1 <= s.head_dim <= 256:
            return "head_dim"
        if not 1 <= s.chunk_tokens <= 4096:
            return "chunk_tokens"
        if s.kv_dtype not in (F32, F16, BF16):
            return "kv_dtype"
        if s.routing_dtype not in (F32, F16, BF16, I8):
            return "routing_dtype"
        for f, names in ENUM_NAMES.items():
            if not 0 <= getattr(s, f) < len(names):
                return f
        if not 1 <= s.default_top_k <= 1024:
            return "default_top_k"
        if len(s.model.encode()) > 255:
            return "model"
        return None

    def to_json(self) -> dict:
        d = {
            "layers": list(self.layers), "kv_heads": self.kv_heads,
            "query_heads": self.query_heads, "head_dim": self.head_dim,
            "chunk_tokens": self.chunk_tokens,
            "kv_dtype": DTYPE_NAMES.get(self.kv_dtype, self.kv_dtype),
            "routing_dtype": DTYPE_NAMES.get(self.routing_dtype, self.routing_dtype),
            "separate_router_keys": self.separate_router_keys,
            "default_top_k": self.default_top_k, "model": self.model,
        }
        for f, names in ENUM_NAMES.items():
            v = getattr(self, f)
            d[f] = names[v] if 0 <= v < len(names) else v
        return d


def valid_name(name: str) -> bool:
    return (1 <= len(name) <= 64 and
            all(c.isascii() and (c.isalnum() or c in "_.-") for c in name))


# ---- routing and attention ----------------------------------------------------

class Oracle:
    index_round = True   # see module docstring
    i8_rerank = True     # see module docstring

    # -- the routing keys of one (document, layer) as the index holds them --
    def index_keys(self, schema: Schema, router_stored: np.ndarray) -> np.ndarray:
        """router_stored: [C, H, D] float32 values in the router store dtype
        (or the stored K for non-separate). Returns float64 keys as scored."""
        k = np.asarray(router_stored, dtype=np.float32)
        if not schema.separate_router_keys and schema.routing_dtype in (F32, F16, BF16):
            k = round_to(schema.routing_dtype, k)   # stored K converted to routing_dtype
        if schema.similarity == COSINE:
            k = l2_normalize(k).astype(np.float32)
            if self.index_round and schema.routing_dtype in (F16, BF16):
                k = round_to(schema.routing_dtype, k)
        if schema.routing_dtype == I8 and not self.i8_rerank:
            q, s = quantize_i8(k)
            return q.astype(np.float64) * s.astype(np.float64)
        return k.astype(np.float64)

    def row_scores(self, schema: Schema, q: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """q [T, Hq, D] float, keys [R, H, D] float64 -> per-row scores [R]
        after head and query reduce."""
        T, Hq, D = q.shape
        H = schema.kv_heads
        G = Hq // H
        qq = np.asarray(q, dtype=np.float64)
        if schema.similarity == COSINE:
            qq = l2_normalize(qq)
        kk = keys[:, np.arange(Hq) // G, :]            # [R, Hq, D]
        s = np.einsum("tjd,rjd->tjr", qq, kk)           # [T, Hq, R]
        s = s.mean(axis=1) if schema.head_reduce == HEAD_MEAN else s.max(axis=1)  # [T, R]
        if schema.query_reduce == QUERY_MAX:
            return s.max(axis=0)
        if schema.query_reduce == QUERY_MEAN:
            return s.mean(axis=0)
        return s[T - 1]

    def score_bound(self, schema: Schema, q: np.ndarray, keys_list) -> float:
        """max |q_tj| * max |k_rh|: the size that dot-product errors scale with."""
        qq = np.asarray(q, dtype=np.float64)
        if schema.similarity == COSINE:
            return 1.0
        qn = np.sqrt((qq * qq).sum(-1)).max() if qq.size else 0.0
        kn = max((np.sqrt((k * k).sum(-1)).max() for k in keys_list if k.size), default=0.0)
        return float(max(qn * kn, 1e-30))

    def route_layer(self, schema: Schema, docs: Dict[int, "Doc"], layer: int, q: np.ndarray,
                    top_k: int, exclude: Sequence[int] = ()):
        """Returns (ranked [(score, id)] of all candidates, score_bound)."""
        ex = set(exclude)
        ranked = []
        keys_all = []
        for did, d in docs.items():
            if did in ex:
                continue
            keys = self.index_keys(schema, d.router[layer])
            keys_all.append(keys)
            rs = self.row_scores(schema, q, keys)
            sc = rs.max() if schema.chunk_reduce == CHUNK_MAX else rs.mean()
            ranked.append((float(sc), did))
        ranked.sort(key=lambda p: (-p[0], p[1]))
        return ranked, self.score_bound(schema, q, keys_all)

    @staticmethod
    def attend_layer(schema: Schema, docs: Dict[int, "Doc"], layer: int, doc_ids: Sequence[int],
                     q: np.ndarray, scale: float = 0.0):
        """Attention of q [T, Hq, D] over the stored pooled K/V of doc_ids.
        Returns (out [T, Hq, D] float64, lse [T, Hq] float64)."""
        T, Hq, D = q.shape
        H = schema.kv_heads
        G = Hq // H
        if scale == 0.0:
            scale = 1.0 / math.sqrt(D)
        if not doc_ids:
            return np.zeros((T, Hq, D)), np.full((T, Hq), -np.inf)
        K = np.concatenate([docs[i].k[layer] for i in doc_ids], axis=0).astype(np.float64)
        V = np.concatenate([docs[i].v[layer] for i in doc_ids], axis=0).astype(np.float64)
        Kj = K[:, np.arange(Hq) // G, :]                     # [R, Hq, D]
        Vj = V[:, np.arange(Hq) // G, :]
        logit = scale * np.einsum("tjd,rjd->tjr", np.asarray(q, np.float64), Kj)
        m = logit.max(axis=2, keepdims=True)
        e = np.exp(logit - m)
        ssum = e.sum(axis=2, keepdims=True)
        lse = (m + np.log(ssum))[:, :, 0]
        out = np.einsum("tjr,rjd->tjd", e / ssum, Vj)
        return out, lse


# ---- the store model ----------------------------------------------------------

@dataclass
class Doc:
    id: int
    version: int
    tokens: int
    chunks: int
    created_seq: int
    updated_seq: int
    text: bytes
    metadata: bytes
    k: Dict[int, np.ndarray] = field(default_factory=dict)        # layer -> [C,H,D] f32 values
    v: Dict[int, np.ndarray] = field(default_factory=dict)
    r: Dict[int, np.ndarray] = field(default_factory=dict)        # stored router_k (separate)

    @property
    def router(self) -> Dict[int, np.ndarray]:
        return self.r if self.r else self.k


@dataclass
class Collection:
    name: str
    schema: Schema
    created_seq: int
    docs: Dict[int, Doc] = field(default_factory=dict)

    def tensor_bytes(self, d: Doc) -> int:
        s = self.schema
        n = 0
        for layer in s.layers:
            n += d.k[layer].size * DTYPE_SIZE[s.kv_dtype] * 2
            if d.r:
                n += d.r[layer].size * DTYPE_SIZE[s.router_store_dtype]
        return n

    def info(self) -> dict:
        return {
            "name": self.name,
            "documents": len(self.docs),
            "chunks": sum(d.chunks for d in self.docs.values()),
            "tokens": sum(d.tokens for d in self.docs.values()),
            "bytes": sum(self.tensor_bytes(d) + len(d.text) + len(d.metadata)
                         for d in self.docs.values()),
            "created_seq": self.created_seq,
        }


class StoreError(Exception):
    def __init__(self, code: str, field: str = ""):
        super().__init__(f"{code}: {field}")
        self.code = code
        self.field = field


@dataclass
class PutLayer:
    layer: int
    k: np.ndarray                  # the array as sent (npy form: f4/f2/u2-bits/i1)
    v: np.ndarray
    router_k: Optional[np.ndarray] = None
    k_dtype: int = F32
    v_dtype: int = F32
    r_dtype: int = F32


@dataclass
class Op:
    kind: str                      # "put" | "delete"
    id: int
    text: bytes = b""
    metadata: bytes = b""
    tokens: int = 0
    raw: bool = False
    layers: List[PutLayer] = field(default_factory=list)
    expect_version: int = 0
    expect_absent: bool = False


class Store:
    """The state of one data directory, as SEMANTICS says it evolves."""

    def __init__(self):
        self.seq = 0
        self.colls: Dict[str, Collection] = {}

    def clone(self) -> "Store":
        return copy.deepcopy(self)

    # -- collections --
    def create(self, name: str, schema: Schema) -> Collection:
        if not valid_name(name):
            raise StoreError("EINVAL", "name")
        s = schema.with_defaults()
        bad = s.validate()
        if bad:
            raise StoreError("EINVAL", "schema." + bad)
        if name in self.colls:
            raise StoreError("EEXIST", "name")
        self.seq += 1
        c = Collection(name, s, self.seq)
        self.colls[name] = c
        return c

    def drop(self, name: str) -> int:
        if name not in self.colls:
            raise StoreError("ENOTFOUND", "name")
        self.seq += 1
        del self.colls[name]
        return self.seq

    def coll(self, name: str) -> Collection:
        if not valid_name(name):
            raise StoreError("EINVAL", "collection")
        if name not in self.colls:
            raise StoreError("ENOTFOUND", "collection")
        return self.colls[name]

    # -- writes --
    def _stored_layer(self, s: Schema, op: Op, i: int, j: int, pl: PutLayer):
        H, D, P = s.kv_heads, s.head_dim, s.chunk_tokens
        C = -(-op.tokens // P)
        rows = op.tokens if op.raw else C
        path = f"ops[{i}].put.layers[{j}]"
        for name, arr, dt in (("k", pl.k, pl.k_dtype), ("v", pl.v, pl.v_dtype),
                              ("router_k", pl.router_k, pl.r_dtype)):
            if arr is None:
                continue
            if dt not in (F32, F16, BF16):
                raise StoreError("EINVAL", f"{path}.{name}")
            if tuple(arr.shape) != (rows, H, D):
                raise StoreError("EINVAL", f"{path}.{name}")
            if not np.all(np.isfinite(decode(dt, arr))):
                raise StoreError("EINVAL", f"{path}.{name}")

        def store(arr, dt, to):
            x = decode(dt, arr)
            if op.raw:
                x = pool(x, P)
            return round_to(to, x)

        k = store(pl.k, pl.k_dtype, s.kv_dtype)
        v = store(pl.v, pl.v_dtype, s.kv_dtype)
        r = None
        if pl.router_k is not None:
            r = store(pl.router_k, pl.r_dtype, s.router_store_dtype)
        return k, v, r

    def write(self, collection: str, ops: List[Op], model: str = ""):
        """Applies a request all-or-nothing. Returns (commit_seq, versions);
        raises StoreError (and changes nothing) otherwise."""
        c = self.coll(collection)
        s = c.schema
        # validation (stateless)
        if not ops:
            raise StoreError("EINVAL", "ops")
        staged = []
        for i, op in enumerate(ops):
            if op.kind not in ("put", "delete"):
                raise StoreError("EINVAL", f"ops[{i}]")
            if not 1 <= op.id <= ID_MAX:
                raise StoreError("EINVAL", f"ops[{i}].put.id" if op.kind == "put"
                                 else f"ops[{i}].delete_id")
            if op.kind == "put":
                if op.tokens <= 0:
                    raise StoreError("EINVAL", f"ops[{i}].put.tokens")
                seen = set()
                for j, pl in enumerate(op.layers):
                    if pl.layer not in s.layers or pl.layer in seen:
                        raise StoreError("EINVAL", f"ops[{i}].put.layers[{j}]")
                    seen.add(pl.layer)
                    if (pl.router_k is not None) != s.separate_router_keys:
                        raise StoreError("EINVAL", f"ops[{i}].put.layers[{j}].router_k")
                if seen != set(s.layers):
                    raise StoreError("EINVAL", f"ops[{i}].put.layers")
                staged.append({pl.layer: self._stored_layer(s, op, i, j, pl)
                               for j, pl in enumerate(op.layers)})
            else:
                staged.append(None)
        if model and model != s.model:
            raise StoreError("EPRECOND", "model")
        # apply to a copy (all or nothing)
        docs = dict(c.docs)
        seq = self.seq + 1
        versions = []
        for i, op in enumerate(ops):
            cur = docs.get(op.id)
            if op.expect_absent and cur is not None:
                raise StoreError("EEXIST", f"ops[{i}]")
            if op.expect_version and (cur is None or cur.version != op.expect_version):
                raise StoreError("EPRECOND", f"ops[{i}]")
            if op.kind == "delete":
                if cur is None:
                    raise StoreError("ENOTFOUND", f"ops[{i}]")
                del docs[op.id]
                versions.append(0)
                continue
            layers = staged[i]
            d = Doc(op.id, cur.version + 1 if cur else 1, op.tokens,
                    -(-op.tokens // s.chunk_tokens), cur.created_seq if cur else seq, seq,
                    op.text, op.metadata)
            for layer, (k, v, r) in layers.items():
                d.k[layer], d.v[layer] = k, v
                if r is not None:
                    d.r[layer] = r
            docs[op.id] = d
            versions.append(d.version)
        c.docs = docs
        self.seq = seq
        return seq, versions
