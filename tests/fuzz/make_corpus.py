#!/usr/bin/env python3
"""make_corpus.py — writes the seed corpora of the fuzz targets into tests/fuzz/corpus/.

    ~/.cache/msad/venv/bin/python tests/fuzz/make_corpus.py     # rewrites corpus/{rpc,tensor,config}/

Deterministic: the same files every run, so the checked-in corpus only changes
when this script does. Request messages are built with protobuf stubs that
protoc generates from rpc/memory.proto into a temporary directory; the .npy
and schema seeds are hand-built bytes following client/npy.c and
storage/schema.c.

fuzz_rpc inputs are one selector byte (see fuzz_rpc.c) followed by the
serialized request. They target the fixture of fuzz_rpc.c:
  "c": layers [0, 3], H 2, Hq 4, D 8, P 4, BF16/BF16, COSINE, model "m"
  "s": layer [1], H 1, Hq 2, D 4, P 2, F32 K/V, I8 routing, router_k, DOT
  "h": layer [0], H 1, Hq 1, D 2, P 1, F16/F16, DOT, QUERY_LAST
each holding document 1.
"""
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "corpus")

SEL = {name: i for i, name in enumerate([
    "Write", "Route", "Attend", "CreateCollection", "Get", "List", "DescribeCollection",
    "ListCollections", "DropCollection", "Stats", "Backup", "Verify", "HealthCheck"])}

F32, F16, BF16, I8 = 1, 2, 3, 4


def load_pb():
    tmp = tempfile.mkdtemp(prefix="msa-corpus-")
    subprocess.check_call(["protoc", "-I" + os.path.join(ROOT, "rpc"), "--python_out=" + tmp,
                           os.path.join(ROOT, "rpc", "memory.proto")])
    sys.path.insert(0, tmp)
    import memory_pb2  # noqa: E402
    shutil.rmtree(tmp)
    return memory_pb2


def bf16(x):
    """float32 -> bf16 bits, round to nearest even (finite inputs)."""
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


def tensor(pb, dtype, shape, values):
    if dtype == F32:
        data = struct.pack("<%df" % len(values), *values)
    elif dtype == F16:
        data = struct.pack("<%de" % len(values), *values)
    elif dtype == BF16:
        data = struct.pack("<%dH" % len(values), *[bf16(v) for v in values])
    else:
        data = struct.pack("<%db" % len(values), *values)
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


def vals(n, seed):
    return [((i * 7 + seed * 3) % 11 - 5) * 0.25 for i in range(n)]


def write(out, name, data):
    os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


def rpc_seeds(pb):
    s = {}

    def req(method, msg):
        return bytes([SEL[method]]) + msg.SerializeToString()

    # ---- writes: one per collection, pooled and raw, delete, multi-op, expect_*
    def doc_c(i, raw=False, tokens=3):
        rows = tokens if raw else (tokens + 3) // 4
        d = pb.Document(id=i, text="doc %d" % i, metadata=b'{"k":1}', tokens=tokens, raw=raw)
        for layer in (0, 3):
            d.layers.add(layer=layer, k=tensor(pb, BF16, (rows, 2, 8), vals(rows * 16, i)),
                         v=tensor(pb, BF16, (rows, 2, 8), vals(rows * 16, i + 1)))
        return d

    def doc_s(i, raw=False, tokens=4):
        rows = tokens if raw else (tokens + 1) // 2
        d = pb.Document(id=i, text="s%d" % i, tokens=tokens, raw=raw)
        d.layers.add(layer=1, k=tensor(pb, F32, (rows, 1, 4), vals(rows * 4, i)),
                     v=tensor(pb, F32, (rows, 1, 4), vals(rows * 4, i + 2)),
                     router_k=tensor(pb, F32, (rows, 1, 4), vals(rows * 4, i + 5)))
        return d

    def doc_h(i, tokens=2):
        d = pb.Document(id=i, tokens=tokens)
        d.layers.add(layer=0, k=tensor(pb, F16, (tokens, 1, 2), vals(tokens * 2, i)),
                     v=tensor(pb, F16, (tokens, 1, 2), vals(tokens * 2, i + 1)))
        return d

    w = pb.WriteRequest(collection="c", model="m")
    w.ops.add(put=doc_c(2))
    s["write_c_pooled"] = req("Write", w)
    w = pb.WriteRequest(collection="c")
    w.ops.add(put=doc_c(3, raw=True, tokens=6))
    s["write_c_raw"] = req("Write", w)
    w = pb.WriteRequest(collection="s")
    w.ops.add(put=doc_s(2))
    w.ops.add(put=doc_s(3, raw=True, tokens=3), expect_absent=True)
    w.ops.add(delete_id=1, expect_version=1)
    s["write_s_multi"] = req("Write", w)
    w = pb.WriteRequest(collection="h")
    w.ops.add(put=doc_h(2))
    s["write_h"] = req("Write", w)
    w = pb.WriteRequest(collection="h")
    w.ops.add(delete_id=2)
    s["write_h_delete"] = req("Write", w)
    w = pb.WriteRequest(collection="c")
    bad = doc_c(4)
    bad.layers[0].k.shape[:] = [1, 2, 9]  # wrong head_dim: a validation error
    w.ops.add(put=bad)
    s["write_c_bad_shape"] = req("Write", w)
    # Regressions: finite input that only overflows when stored (F16 rounding) or
    # pooled (float32 sum), which once reached the index as Inf.
    w = pb.WriteRequest(collection="h")
    d = pb.Document(id=9, tokens=1)
    d.layers.add(layer=0, k=tensor(pb, F32, (1, 1, 2), [1e6, 1.0]),
                 v=tensor(pb, F32, (1, 1, 2), [1.0, -1e6]))
    w.ops.add(put=d)
    s["write_h_f16_overflow"] = req("Write", w)
    w = pb.WriteRequest(collection="s")
    d = pb.Document(id=9, tokens=2, raw=True)
    d.layers.add(layer=1, k=tensor(pb, F32, (2, 1, 4), [1.0] * 8),
                 v=tensor(pb, F32, (2, 1, 4), [1.0] * 8),
                 router_k=tensor(pb, F32, (2, 1, 4), [3e38] * 8))
    w.ops.add(put=d)
    s["write_s_pool_overflow"] = req("Write", w)

    # ---- route / attend
    def lq(pb_layer, dtype, shape, with_q, seed):
        n = shape[0] * shape[1] * shape[2]
        q = pb.LayerQuery(layer=pb_layer, routing_q=tensor(pb, dtype, shape, vals(n, seed)))
        if with_q:
            q.q.CopyFrom(tensor(pb, dtype, shape, vals(n, seed + 1)))
        return q

    r = pb.RouteRequest(collection="c", model="m", top_k=3)
    r.layers.extend([lq(0, F32, (2, 4, 8), False, 1), lq(3, BF16, (1, 4, 8), False, 2)])
    s["route_c"] = req("Route", r)
    r = pb.RouteRequest(collection="s", exclude_ids=[5])
    r.layers.append(lq(1, F16, (3, 2, 4), False, 3))
    s["route_s"] = req("Route", r)
    r = pb.RouteRequest(collection="h", top_k=1024, min_seq=1)
    r.layers.append(lq(0, F32, (2, 1, 2), False, 4))
    s["route_h"] = req("Route", r)
    a = pb.AttendRequest(collection="c", top_k=2, out_dtype=BF16)
    a.layers.append(lq(3, F32, (2, 4, 8), True, 5))
    s["attend_c"] = req("Attend", a)
    a = pb.AttendRequest(collection="s", doc_ids=[1], scale=0.5, out_dtype=F16)
    a.layers.append(lq(1, F32, (1, 2, 4), True, 6))
    s["attend_s_doc_ids"] = req("Attend", a)
    a = pb.AttendRequest(collection="h")
    a.layers.append(lq(0, F16, (3, 1, 2), True, 7))
    s["attend_h"] = req("Attend", a)

    # ---- collections, get, list, admin
    sch = pb.CollectionSchema(layers=[2, 5, 9], kv_heads=2, query_heads=2, head_dim=4,
                              chunk_tokens=3, kv_dtype=F16, routing_dtype=I8,
                              separate_router_keys=True, similarity=1, head_reduce=1,
                              query_reduce=1, chunk_reduce=1, default_top_k=7, model="x")
    s["create_collection"] = req("CreateCollection",
                                 pb.CreateCollectionRequest(name="new.col-1", schema=sch))
    s["get_all"] = req("Get", pb.GetRequest(collection="c", ids=[1], with_text=True,
                                            with_metadata=True, with_tensors=True))
    s["get_layers"] = req("Get", pb.GetRequest(collection="s", ids=[1], with_tensors=True,
                                               layers=[1]))
    s["list"] = req("List", pb.ListRequest(collection="c", after_id=0, limit=10))
    s["describe"] = req("DescribeCollection", pb.DescribeCollectionRequest(name="s"))
    s["list_collections"] = req("ListCollections", pb.ListCollectionsRequest())
    s["drop_collection"] = req("DropCollection", pb.DropCollectionRequest(name="new.col-1"))
    s["stats"] = req("Stats", pb.StatsRequest())
    s["backup"] = req("Backup", pb.BackupRequest(name="b1", compact=True))
    s["backup_escape"] = req("Backup", pb.BackupRequest(name="../escape"))
    s["verify"] = req("Verify", pb.VerifyRequest(collection="h"))
    svc = b"msa.v1.Memory"
    s["health"] = bytes([SEL["HealthCheck"], 0x0A, len(svc)]) + svc
    return s


def schema_bytes(kv, rt, flags, sim, hr, qr, cr, H, Hq, D, P, k, layers, model):
    b = bytes([1, kv, rt, flags, sim, hr, qr, cr])
    b += struct.pack("<6I", H, Hq, D, P, k, len(layers))
    b += struct.pack("<%dI" % len(layers), *layers)
    return b + bytes([len(model)]) + model


def npy(descr, shape, data, version=1):
    sh = "(" + ", ".join(str(x) for x in shape) + ("," if len(shape) == 1 else "") + ")"
    h = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, sh)
    pre = 10 if version == 1 else 12
    h += " " * ((64 - (pre + len(h) + 1) % 64) % 64) + "\n"
    n = struct.pack("<H", len(h)) if version == 1 else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes([version, 0]) + n + h.encode() + data


def tensor_seeds():
    s = {}
    s["schema_c"] = bytes([0]) + schema_bytes(BF16, BF16, 0, 0, 0, 0, 0, 2, 4, 8, 4, 4,
                                              [0, 3], b"m")
    s["schema_s"] = bytes([0]) + schema_bytes(F32, I8, 1, 1, 1, 1, 1, 1, 2, 4, 2, 2, [1], b"")
    # validate: dtype F32 (1), want any (0); rank 3 and want rank 3 (dims bits 3..4 = 2),
    # want_shape used (0x40); shape [1,2,2,*] want [1,2,2,0].
    shape = bytes([1, 1, 2, 2, 2, 2, 0, 0])
    s["validate_f32"] = bytes([1, 1 | (0 << 3), 3 | (2 << 3) | 0x40]) + shape + \
        struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)
    s["validate_bf16_inf"] = bytes([1, 3 | (3 << 3), 2 | (1 << 3)]) + bytes([2, 0, 2, 0, 0, 0,
                                                                             0, 0]) + \
        struct.pack("<4H", 0x3F80, 0x7F80, 0x4000, 0xC000)
    s["validate_i8"] = bytes([1, 4 | (4 << 3), 1 | (0 << 3)]) + bytes([4, 0] + [0] * 6) + \
        bytes([1, 255, 127, 129])
    s["convert"] = bytes([2]) + struct.pack("<4I", 0x3C003F80, 0x7C00FFFF, 0x00017E00, 0x477FF000)
    s["pool"] = bytes([3, 5, 3, 2]) + struct.pack("<15f", *[float(i) for i in range(15)])
    s["l2"] = bytes([4, 2, 3]) + struct.pack("<6f", 3.0, 4.0, 0.0, 0.0, 0.0, 0.0)
    s["quantize"] = bytes([5, 1, 3]) + struct.pack("<6f", 1.0, -2.0, 0.5, 0.0, 0.0, 0.0)
    s["npy_f32"] = bytes([6]) + npy("<f4", (2, 3), struct.pack("<6f", *range(6)))
    s["npy_u2_v2"] = bytes([6]) + npy("<u2", (4,), struct.pack("<4H", 1, 2, 3, 4), version=2)
    s["npy_i8_scalar"] = bytes([6]) + npy("|i1", (), b"\x05")
    s["npy_i8_ids"] = bytes([6]) + npy("<i8", (2,), struct.pack("<2q", 7, 9))
    s["shape_str"] = bytes([7, 4]) + struct.pack("<4I", 1, 4294967295, 12, 0)
    return s


def config_seeds():
    s = {}
    full = (b"# msad config\n"
            b"data = /var/lib/msad\n"
            b"listen = 127.0.0.1:7420\n"
            b"listen = unix:/run/msad.sock\n"
            b"backend = cpu\nthreads = 4\nhandlers = 16\nmax-queue = 100\n"
            b"tokens-file = '/etc/msad/tokens'\nbackup-dir = \"/srv/backup\"\n"
            b"max-message-mb = 64\nsync = nosync\nmap-max-gb = 8\nshutdown-grace = 5\n"
            b"metrics = 127.0.0.1:9100\nlog-level = debug\nlog-format = json\n")
    s["config_full"] = full + b"\0--config\0@cfg"
    s["config_flags_win"] = b"threads = 2\nsync = full\n\0--config=@cfg\0--threads\0008\0--sync=nosync"
    s["tls"] = (b"tls-cert = /c.pem\ntls-key = /k.pem\ntls-client-ca = /ca.pem\n"
                b"\0--config\0@cfg")
    s["tls_half"] = b"\0--tls-cert\0/c.pem"
    s["bad_key"] = b"nope = 1\n\0--config\0@cfg"
    s["bad_line"] = b"just words\n\0--config=@cfg"
    s["help"] = b"\0--help"
    s["version"] = b"\0--data\0/d\0--version"
    s["no_value"] = b"\0--threads"
    s["missing_config"] = b"\0--config\0/nonexistent/msad.conf"
    return s


def main():
    pb = load_pb()
    for sub, seeds in (("rpc", rpc_seeds(pb)), ("tensor", tensor_seeds()),
                       ("config", config_seeds())):
        d = os.path.join(OUT, sub)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in sorted(seeds.items()):
            write(d, name, data)
        print("%s: %d seeds" % (sub, len(seeds)))


if __name__ == "__main__":
    main()
