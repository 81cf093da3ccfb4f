"""msa_client: Python client of msad, the MSA memory daemon.

Built into build/python/msa_client by CMake (target msa_python): the gRPC stubs
(memory_pb2, memory_pb2_grpc) are generated from rpc/memory.proto at build time and
copied there with this wrapper. Use it with

    PYTHONPATH=build/python python3 -c 'import msa_client'

    from msa_client import Client
    with Client("127.0.0.1:7420") as c:
        c.create_collection("mem", layers=[0, 1], kv_heads=8, query_heads=32, head_dim=128)
        c.put("mem", 7, {0: (k0, v0), 1: (k1, v1)}, tokens=1024, text="...")
        ids, scores = c.route("mem", {0: rq0})[0]
"""

from .client import (  # noqa: F401
    AttendLayer,
    Client,
    MsaError,
    Page,
    Records,
    Result,
    bf16_bits_to_f32,
    f32_to_bf16_bits,
)
from . import memory_pb2, memory_pb2_grpc  # noqa: F401

__all__ = [
    "Client",
    "MsaError",
    "AttendLayer",
    "Result",
    "Records",
    "Page",
    "f32_to_bf16_bits",
    "bf16_bits_to_f32",
    "memory_pb2",
    "memory_pb2_grpc",
]
