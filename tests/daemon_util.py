"""Start and stop a real msad for integration tests, and talk to it with
grpcio stubs generated from the proto at test time.

Reusable by any test:

    from daemon_util import Daemon, stubs, tensor
    pb, pb_grpc, hpb, hpb_grpc = stubs()
    with Daemon() as d:                      # temp data dir, free loopback port
        mem = d.memory()                     # msa.v1.Memory stub
        mem.CreateCollection(pb.CreateCollectionRequest(...))

Environment: MSA_BIN (directory holding msad; default /work/main/build/bin),
MSA_SOURCE (repo root, for rpc/*.proto; default: this file's parent's parent),
MSA_STUBS_DIR (stubs generated ahead, for machines without protoc: the GPU
machine gets them from ops/gpu-bundle).
Daemon logs go to <tmp>/msad.log; Daemon.log_tail() returns its end for
failure messages.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import unittest
import time

import numpy as np

SOURCE = os.environ.get("MSA_SOURCE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MSA_BIN") or os.path.join(SOURCE, "build", "bin")

_stubs = None
_stubs_lock = threading.Lock()


def msad_path():
    return os.path.join(BIN, "msad")


def stubs():
    """(memory_pb2, memory_pb2_grpc, health_pb2, health_pb2_grpc), generated
    once per process with grpcio-tools (the venv's) into a temp dir."""
    global _stubs
    with _stubs_lock:
        if _stubs is not None:
            return _stubs
        ready = os.environ.get("MSA_STUBS_DIR")
        if ready and os.path.exists(os.path.join(ready, "memory_pb2.py")):
            sys.path.insert(0, ready)
            import memory_pb2, memory_pb2_grpc, health_pb2, health_pb2_grpc  # noqa: E401
            _stubs = (memory_pb2, memory_pb2_grpc, health_pb2, health_pb2_grpc)
            return _stubs
        out = tempfile.mkdtemp(prefix="msa-stubs-")
        rpc = os.path.join(SOURCE, "rpc")
        # grpcio-tools from the venv: stubs of the same release as the runtime.
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "--python_out=" + out,
                        "--grpc_python_out=" + out, "-I", rpc,
                        os.path.join(rpc, "memory.proto"), os.path.join(rpc, "health.proto")],
                       check=True)
        sys.path.insert(0, out)
        import memory_pb2, memory_pb2_grpc, health_pb2, health_pb2_grpc  # noqa: E401
        _stubs = (memory_pb2, memory_pb2_grpc, health_pb2, health_pb2_grpc)
        return _stubs


def free_port():
    """A port that was free a moment ago (prefer --listen 127.0.0.1:0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- tensors -----------------------------------------------------------------

# bf16 codecs: the Python tests' one copy is the independent reference's
# (oracle.py), never the code under test.
from oracle import bf16_bits_to_f32, f32_to_bf16_bits  # noqa: E402,F401


def tensor(a, dtype="F32"):
    """A memory_pb2.Tensor from a NumPy array (dtype F32, F16 or BF16)."""
    pb = stubs()[0]
    a = np.asarray(a)
    if dtype == "F32":
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    elif dtype == "F16":
        data = np.ascontiguousarray(a, dtype="<f2").tobytes()
    elif dtype == "BF16":
        data = f32_to_bf16_bits(a).astype("<u2").tobytes()
    else:
        raise ValueError(dtype)
    return pb.Tensor(dtype=getattr(pb, dtype), shape=list(a.shape), data=data)


def from_tensor(t):
    """A float32 NumPy array from a memory_pb2.Tensor."""
    pb = stubs()[0]
    shape = tuple(t.shape)
    if t.dtype == pb.F32:
        return np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)
    if t.dtype == pb.F16:
        return np.frombuffer(t.data, dtype="<f2").reshape(shape).astype(np.float32)
    if t.dtype == pb.BF16:
        return bf16_bits_to_f32(np.frombuffer(t.data, dtype="<u2")).reshape(shape)
    raise ValueError(t.dtype)


# ---- the daemon ----------------------------------------------------------------

class Daemon:
    """One msad process on a temp data dir (or data_dir) and loopback.

    args: extra flags. listen: list of --listen values (default one
    127.0.0.1:0; the real port is read from the "listening on" line).
    metrics=True adds --metrics 127.0.0.1:0. preexec_fn runs in the child
    before exec (e.g. resource.setrlimit for a low file limit).
    """

    def __init__(self, data_dir=None, args=(), listen=None, metrics=False, tmp=None,
                 start_timeout=30.0, preexec_fn=None):
        self.tmp = tmp or tempfile.mkdtemp(prefix="msad-test-")
        self._own_tmp = tmp is None
        self.data_dir = data_dir or os.path.join(self.tmp, "data")
        self.args = list(args)
        self.listen = list(listen) if listen else ["127.0.0.1:0"]
        self.metrics = metrics
        self.start_timeout = start_timeout
        self.preexec_fn = preexec_fn
        self.proc = None
        self.addrs = []
        self.metrics_addr = None
        self.log_path = os.path.join(self.tmp, "msad.log")
        self._channels = []
        self._drainer = None

    # -- lifecycle
    def cmdline(self):
        cmd = [msad_path(), "--data", self.data_dir, "--log-level", "debug"]
        for l in self.listen:
            cmd += ["--listen", l]
        if self.metrics:
            cmd += ["--metrics", "127.0.0.1:0"]
        return cmd + self.args

    def start(self):
        self.addrs = []
        self.metrics_addr = None
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmdline(), stdout=subprocess.PIPE, stderr=log,
                                     stdin=subprocess.DEVNULL, preexec_fn=self.preexec_fn)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        want = len(self.listen)
        lines = []
        # Read stdout lines until every listen address is announced.
        while len(self.addrs) < want or (self.metrics and not self.metrics_addr):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("msad did not start in time:\n" + self.log_tail())
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                rc = self.proc.wait()
                raise RuntimeError("msad exited with %d before listening:\n%s" % (rc, self.log_tail()))
            lines.append(line)
            m = re.match(r"msad: listening on (\S+)", line)
            if m:
                self.addrs.append(m.group(1))
            m = re.match(r"msad: metrics on (\S+)", line)
            if m:
                self.metrics_addr = m.group(1)
        # Keep draining stdout so the daemon never blocks on a full pipe.
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        return self

    def _drain(self):
        try:
            for _ in self.proc.stdout:
                pass
        except Exception:
            pass

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Signals msad and waits; returns its exit code. Channels stay open
        until it has exited, so clients see what a real client would."""
        if not self.proc:
            self.close_channels()
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("msad did not stop within %ss:\n%s" % (timeout, self.log_tail()))
        self.close_channels()
        self._reap()
        return rc

    def _reap(self):
        if self._drainer:
            self._drainer.join(5)
            self._drainer = None
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def kill(self):
        self.close_channels()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def cleanup(self):
        self.kill()
        if self._own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, etype, evalue, tb):
        """Stops msad; a non-zero exit (a crash, a sanitizer report) fails
        the block unless it is already failing."""
        try:
            rc = self.stop() if self.proc else 0
            if rc not in (0, None) and etype is None:
                raise RuntimeError("msad exited with %r:\n%s" % (rc, self.log_tail()))
        finally:
            self.cleanup()

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    # -- clients
    @property
    def addr(self):
        return self.addrs[0]

    def target(self, i=0):
        a = self.addrs[i]
        return a if a.startswith("unix:") else a

    def channel(self, i=0, options=None):
        import grpc
        opts = [("grpc.max_receive_message_length", 512 << 20),
                ("grpc.max_send_message_length", 512 << 20)]
        ch = grpc.insecure_channel(self.target(i), options=opts + list(options or []))
        self._channels.append(ch)
        return ch

    def close_channels(self):
        for ch in self._channels:
            try:
                ch.close()
            except Exception:
                pass
        self._channels = []

    def memory(self, channel=None):
        return stubs()[1].MemoryStub(channel or self.channel())

    def admin(self, channel=None):
        return stubs()[1].AdminStub(channel or self.channel())

    def health(self, channel=None):
        return stubs()[3].HealthStub(channel or self.channel())

    def wait_healthy(self, timeout=10):
        hpb = stubs()[2]
        h = self.health()
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = h.Check(hpb.HealthCheckRequest(), timeout=2)
                if r.status == hpb.HealthCheckResponse.SERVING:
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def metrics_text(self):
        import urllib.request
        with urllib.request.urlopen("http://%s/metrics" % self.metrics_addr, timeout=10) as r:
            return r.read().decode()


def parse_metrics(text):
    """Prometheus text -> (help: {family: text}, samples: {(name, labels): value});
    labels is a frozenset of (key, value)."""
    helps, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, h = line[7:].partition(" ")
            helps[name] = h
        elif line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, rest = series.partition("{")
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', rest))
            samples[(name, labels)] = float(value)
    return helps, samples


def check_stats_metrics(tc, memory, metrics_text):
    """Every Stats figure has a /metrics family (issue 12: the lists are kept
    once, in rpc/rpc_lists.h). The mapping rule:
      - counter "requests.<M>": the samples msad_requests_total{method="<M>"};
        "errors.<M>": the same samples with code != "OK"; "status.<C>":
        msad_errors_total{code="<C>"};
      - every other counter key K (engine.*, gpu.*, rpc.*) and every numeric
        StatsResponse field F (commit_seq, store_bytes, ...): the one family
        whose HELP text ends with "[Stats: K]" (or "[Stats: F]").
    Engine and GPU figures must also agree in value: /metrics is read before
    and after Stats, and the Stats value must lie between the two (rpc.* and
    request counters move with the reads themselves: presence only).
    Call it on a server with no load of its own. Returns the Stats response."""
    pb = stubs()[0]
    helps0, before = parse_metrics(metrics_text())
    s = memory.Stats(pb.StatsRequest())
    helps, after = parse_metrics(metrics_text())
    by_key = {}
    for fam, h in helps.items():
        m = re.search(r"\[Stats: ([\w.]+)\]$", h)
        if m:
            tc.assertNotIn(m.group(1), by_key, "two families claim Stats key %s" % m.group(1))
            by_key[m.group(1)] = fam
    fields = [f.name for f in s.DESCRIPTOR.fields
              if f.type in (f.TYPE_UINT64, f.TYPE_UINT32, f.TYPE_INT64)]
    keys = list(s.counters.keys()) + fields
    tc.assertTrue(any(k.startswith("engine.") for k in keys), keys)
    for k in keys:
        if k.startswith(("requests.", "errors.")):
            method = k.split(".", 1)[1]
            tc.assertTrue(any(n == "msad_requests_total" and ("method", method) in lab
                              for (n, lab) in after), "no /metrics series for %s" % k)
            continue
        if k.startswith("status."):
            code = k.split(".", 1)[1]
            tc.assertIn(("msad_errors_total", frozenset({("code", code)})), after,
                        "no /metrics series for %s" % k)
            continue
        tc.assertIn(k, by_key, "Stats %s has no /metrics family ([Stats: %s] in a HELP line)"
                    % (k, k))
        series = (by_key[k], frozenset())
        tc.assertIn(series, after, "family %s of %s has no sample" % (by_key[k], k))
        if k.startswith("rpc."):
            continue
        v = s.counters[k] if k in s.counters else getattr(s, k)
        lo, hi = before.get(series, after[series]), after[series]
        tc.assertTrue(lo <= v <= hi, "%s: Stats %d, /metrics %g .. %g" % (k, v, lo, hi))
    return s


class GrpcCase(unittest.TestCase):
    """unittest.TestCase with assertCode: the call fails with this gRPC status and
    its details contain every string of ``contains`` (a string or a sequence)."""

    def assertCode(self, code, fn, *args, contains=(), **kw):
        import grpc
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kw)
        err = cm.exception
        self.assertEqual(err.code(), code, "details: %s" % err.details())
        for c in ([contains] if isinstance(contains, str) else contains):
            self.assertIn(c, err.details() or "")
        return err


def cpu_model():
    """The CPU model name (/proc/cpuinfo) that benchmarks print beside every figure."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def run_pytest_file(path, built, pydir, *args):
    """Entry of a pytest-style test file run as a script (CTest runs every
    tests/test_*.py that way): exit 77 when msad or the client package is not
    built, else pytest's exit code."""
    if not built:
        print("skip: msad or the msa_client package (%s) not built" % pydir)
        sys.exit(77)
    import pytest
    sys.exit(pytest.main([path, "-q", "-p", "no:cacheprovider", "-W",
                          "ignore::DeprecationWarning"] + list(args)))
