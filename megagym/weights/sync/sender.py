"""Trainer side of weight sync: push exported HF-named weights into every policy server.

One interface, one class per transport (`make_sender(backend, urls, ...)` picks one):
- `ShmWeightSender`  ("shm"): buckets are packed into /dev/shm segments (two, used in turn, so
  packing bucket k+1 overlaps the servers loading bucket k) that every server on the host maps;
  the HTTP calls carry only the segment path and the manifest. CPU, or GPUs on one host.
- `NcclWeightSender` ("nccl"): vLLM's `nccl` backend; one NCCL group holds the trainer (rank 0)
  and every server's workers; each bucket is one `/weights/update` per server plus a packed
  broadcast. Separate GPUs.
- `IpcWeightSender`  ("ipc"): vLLM's `ipc` backend; each bucket is packed into one CUDA buffer
  whose IPC handle is sent over HTTP. Trainer and engine on the same GPU.

Call sequence (rank 0 of the trainer only; other ranks just take part in the export):

    sender = make_sender("shm", ["http://host:8000", ...], bucket_bytes=256 << 20)
    sender.init()                                  # once: rendezvous with every server
    for step in ...:
        optimizer.step()
        stats = sender.send(export_hf_weights(model), weight_version=step + 1)
    sender.close()                                 # frees /dev/shm segments, NCCL group

`send` = `begin()` (servers pause: with `pause_mode="wait"` in-flight requests finish first, with
"keep" they freeze and continue on the new weights after the commit) -> `push(named_tensors)`
(bucket by bucket) -> `commit(weight_version)` (servers bump their version and resume); any
error calls `abort()` (servers resume; layers the update had not completed keep their old
weights, `GET /weights/info` reports `consistent: false` until the next full update) and
re-raises. Every `/dev/shm` segment is the sender's: `close()` unlinks them, and `init()`
removes those left by trainers that died.

A server that is gone is dropped, not fatal: one whose call fails with a connection error or a
timeout (any phase, init included), or that answers 503 "engine dead", leaves the group for the
rest of the run; the sync goes on with the others, `SyncStats.lost_servers` names the servers lost
during that sync, `sender.lost` all lost so far, `sender.urls` those still served, and one line
naming the lost server is printed. Only when no server is left does the sync raise
`WeightSyncFailed`. Any other HTTP error (4xx, 5xx) is a real error: it fails the sync as before.
The shm data plane needs nothing from a lost server (the segments are the sender's). The NCCL
transport cannot lose a member in the middle of a collective; a server lost there fails the sync.

Must not: import megatron (it takes any iterable of `(name, tensor)`), or send tensors as RPC
arguments. The GPU transports are written against vLLM 0.32's documented helpers and are not
exercised on CPU.
"""

from __future__ import annotations

import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
import torch

from megagym.weights.sync.buckets import (
    ShmSegment,
    bucket_size,
    iter_buckets,
    nbytes_of,
    pack_into,
    remove_orphaned_segments,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20
PAUSE_MODES = ("wait", "abort", "keep")  # as engine_side.PAUSE_MODES (not imported: no vLLM here)


class WeightSyncFailed(RuntimeError):
    """A server refused or failed a weight-sync call; the message names the server and its reason."""


class ServerLost(WeightSyncFailed):
    """A server is gone (connection refused or reset, timeout, 503 engine dead)."""

    def __init__(self, url: str, message: str):
        super().__init__(message)
        self.url = url


@dataclass
class SyncStats:
    """What one `send` moved and how long it took (wall seconds, this process)."""

    weight_version: int
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    pack_seconds: float = 0.0  # shm: time spent copying into the segments (overlaps loading)
    server_timings: dict | None = None  # first server's seconds per phase (pause/start/update/finish/resume)
    # servers dropped during this sync (or since the previous successful one: init, failed syncs)
    lost_servers: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class ServerGroup:
    """HTTP control plane to every policy server: each call fans out and waits for all.

    A server that is gone (`ServerLost`) is dropped from the group for good; `urls` lists the
    servers still in it, `lost` those dropped, and `take_lost()` those dropped since it was last
    called. A call raises `WeightSyncFailed` when a server refuses it or when no server is left.
    """

    def __init__(self, urls: list[str] | str, timeout_s: float = 600.0, api_key: str | None = None):
        self.all_urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.all_urls:
            raise ValueError("no policy server URLs given")
        self.timeout_s = timeout_s
        self.sessions = {u: requests.Session() for u in self.all_urls}
        for s in self.sessions.values():
            if api_key:  # the servers' bearer key (servers.settings.api_key)
                s.headers["Authorization"] = f"Bearer {api_key}"
        self.alive: list[str] = list(self.all_urls)
        self.lost: list[str] = []
        self._new_lost: list[str] = []
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(self.all_urls)), thread_name_prefix="wsync")

    @property
    def urls(self) -> list[str]:
        return list(self.alive)

    def _call(self, url: str, method: str, path: str, body: dict | None) -> dict:
        full = f"{url}/weights/{path}"
        try:
            r = self.sessions[url].request(method, full, json=body, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ServerLost(url, f"{method} {full}: {type(exc).__name__}: {exc}") from exc
        except requests.RequestException as exc:
            raise WeightSyncFailed(f"{method} {full}: {exc}") from exc
        try:
            payload = r.json()
        except ValueError:
            payload = {"error": r.text[:2000]}
        if not isinstance(payload, dict):
            payload = {"error": payload}
        if r.status_code == 503 and "engine dead" in str(payload.get("error", "")):
            raise ServerLost(url, f"{method} {full} -> HTTP 503: {payload['error']}")
        if r.status_code != 200:
            raise WeightSyncFailed(f"{method} {full} -> HTTP {r.status_code}: {payload.get('error', payload)}")
        return payload

    def submit(self, path: str, body: dict | None = None, method: str = "POST",
               per_server: list[dict] | None = None) -> list[Future]:
        """One call per server still in the group (`per_server[i]`: the body for `urls[i]`)."""
        if not self.alive:
            raise WeightSyncFailed(f"no policy server left (lost: {', '.join(self.lost)})")
        if per_server is not None and len(per_server) != len(self.alive):
            raise ValueError(f"per_server: {len(per_server)} bodies for {len(self.alive)} servers")
        return [
            self.pool.submit(self._call, url, method, path, per_server[i] if per_server else body)
            for i, url in enumerate(self.alive)
        ]

    def wait(self, futures: list[Future]) -> list[dict]:
        """The answers of the servers that are still there (in `urls` order)."""
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except ServerLost as exc:
                self._drop(exc)
            except Exception as exc:  # collect every server's failure, not just the first
                errors.append(exc)
        if errors:
            raise WeightSyncFailed("; ".join(str(e) for e in errors)) from errors[0]
        if not self.alive:
            raise WeightSyncFailed(f"no policy server left (lost: {', '.join(self.lost)})")
        return results

    def call(self, path: str, body: dict | None = None, method: str = "POST",
             per_server: list[dict] | None = None) -> list[dict]:
        return self.wait(self.submit(path, body, method, per_server))

    def take_lost(self) -> list[str]:
        """Servers dropped since the last call of this method."""
        out, self._new_lost = self._new_lost, []
        return out

    def _drop(self, exc: ServerLost) -> None:
        if exc.url not in self.alive:
            return
        self.alive.remove(exc.url)
        self.lost.append(exc.url)
        self._new_lost.append(exc.url)
        print(f"megagym weight sync: lost policy server {exc.url} ({str(exc)[:300]}); dropped for the rest of "
              f"the run, {len(self.alive)} server(s) left", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for s in self.sessions.values():
            s.close()


class WeightSender(ABC):
    """Pushes weights into every server in `urls`; subclasses provide the data plane."""

    backend: str = ""

    def __init__(self, urls: list[str] | str, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 pause_mode: str = "wait", timeout_s: float = 600.0, api_key: str | None = None):
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode: must be one of {PAUSE_MODES}, got {pause_mode!r}")
        self.servers = ServerGroup(urls, timeout_s, api_key)
        self.bucket_bytes = int(bucket_bytes)
        self.pause_mode = pause_mode
        self._initialized = False
        self._active = False
        self._stats: SyncStats | None = None

    @property
    def urls(self) -> list[str]:
        """The servers still in the group."""
        return self.servers.urls

    @property
    def lost(self) -> list[str]:
        """Every server lost so far (dropped for the rest of the run)."""
        return list(self.servers.lost)

    # -- public sequence -------------------------------------------------------------------
    def init(self) -> None:
        """Rendezvous with every server (idempotent)."""
        if not self._initialized:
            self._init()
            self._initialized = True

    def begin(self) -> None:
        """Pause every server (per `pause_mode`) and open an update."""
        self.init()
        if self._active:
            raise RuntimeError("begin() called twice without commit() or abort()")
        self._t0 = time.perf_counter()
        self._stats = SyncStats(weight_version=-1)
        self.servers.call("start", {"pause_mode": self.pause_mode})
        self._active = True

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send a stream of `(name, tensor)` in buckets; may be called several times per update."""
        if not self._active:
            raise RuntimeError("push() outside begin()/commit()")
        self._push(named_tensors)

    def commit(self, weight_version: int | None = None) -> SyncStats:
        """Finish the update on every server; they bump their version and resume serving."""
        if not self._active:
            raise RuntimeError("commit() without begin()")
        answers = self.servers.call("finish", {"weight_version": weight_version})
        versions = {r["weight_version"] for r in answers}
        self._active = False
        if len(versions) != 1:
            log.warning("policy servers report different weight versions after a sync: %s", versions)
        stats = self._stats
        stats.weight_version = max(versions)
        stats.seconds = time.perf_counter() - self._t0
        stats.server_timings = answers[0].get("timings")
        stats.lost_servers = self.servers.take_lost()
        self._after_commit()
        return stats

    def abort(self) -> None:
        """Abandon the update on every server (each keeps serving its previous weights)."""
        self._active = False
        try:
            self.servers.call("abort")
        except WeightSyncFailed:
            log.exception("aborting the weight update failed on some server")

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int | None = None) -> SyncStats:
        """`begin` -> `push` -> `commit`, with `abort` on any error."""
        self.begin()
        try:
            self.push(named_tensors)
            return self.commit(weight_version)
        except BaseException:
            if self._active:
                self.abort()
            raise

    def close(self) -> None:
        if self._active:
            self.abort()
        try:
            self._close()
        finally:
            self.servers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transport hooks --------------------------------------------------------------------
    @abstractmethod
    def _init(self) -> None: ...

    @abstractmethod
    def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def _after_commit(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _count(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self._stats.buckets += 1
        self._stats.tensors += len(bucket)
        self._stats.bytes += sum(nbytes_of(t) for _, t in bucket)


class ShmWeightSender(WeightSender):
    """/dev/shm data plane (one host). Segments live from the first push to `close()`."""

    backend = "shm"

    def __init__(self, urls, *, validate: bool = True, **kw):
        super().__init__(urls, **kw)
        self.validate = validate
        self.segments: list[ShmSegment | None] = [None, None]

    def _init(self) -> None:
        if removed := remove_orphaned_segments():
            log.warning("removed /dev/shm segments left by dead trainers: %s", removed)
        self.servers.call("init", {"init_info": {"validate": self.validate}})

    def _segment(self, slot: int, size: int) -> ShmSegment:
        seg = self.segments[slot]
        if seg is None or seg.size < size:
            if seg is not None:
                seg.close()  # not in use: the pending update reads the other slot
            seg = self.segments[slot] = ShmSegment.create(max(size, self.bucket_bytes), tag=f"{slot}-")
        return seg

    def _push(self, named_tensors) -> None:
        pending: list[Future] = []
        try:
            for i, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
                seg = self._segment(i % 2, bucket_size(bucket))
                t0 = time.perf_counter()
                manifest = pack_into(seg.tensor, bucket)  # overlaps the servers loading bucket i-1
                self._stats.pack_seconds += time.perf_counter() - t0
                done, pending = pending, []
                self.servers.wait(done)
                info = {"shm_path": seg.path, "shm_size": seg.size, **manifest.to_dict()}
                pending = self.servers.submit("update", {"update_info": info})
                self._count(bucket)
        except BaseException:
            for f in pending:  # let the bucket in flight land before the caller aborts
                f.exception()
            raise
        self.servers.wait(pending)

    def _close(self) -> None:
        for seg in self.segments:
            if seg is not None:
                seg.close()
        self.segments = [None, None]


class NcclWeightSender(WeightSender):
    """vLLM's `nccl` backend across separate GPUs: trainer rank 0 broadcasts to all servers' workers.

    `master_address`/`master_port`: a free TCP endpoint on the trainer host for the rendezvous.
    Unverified here (no vLLM on the lent GPU machines); follows vLLM 0.32's NCCL engine contract.
    """

    backend = "nccl"

    def __init__(self, urls, *, master_address: str, master_port: int, **kw):
        super().__init__(urls, **kw)
        self.master_address = master_address
        self.master_port = int(master_port)
        self.group = None

    def _init(self) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        sizes = [int(r["world_size"]) for r in self.servers.call("info", method="GET")]
        world_size = 1 + sum(sizes)
        per_server, offset = [], 1
        for size in sizes:
            per_server.append({"init_info": {
                "master_address": self.master_address, "master_port": self.master_port,
                "rank_offset": offset, "world_size": world_size, "packed": True,
                "packed_buffer_size_bytes": self.bucket_bytes, "packed_num_buffers": 2,
            }})
            offset += size
        # The workers block in the rendezvous until rank 0 joins: call them first, then join.
        futures = self.servers.submit("init", per_server=per_server)
        self.group = trainer_init(
            {"master_address": self.master_address, "master_port": self.master_port, "world_size": world_size}
        )
        self.servers.wait(futures)

    def _push(self, named_tensors) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            bucket = [(n, t.detach().cuda() if not t.is_cuda else t.detach()) for n, t in bucket]
            info = {
                "names": [n for n, _ in bucket],
                "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
            }
            futures = self.servers.submit("update", {"update_info": info})
            packed_nccl_broadcast_producer(
                iterator=iter(bucket), group=self.group, src=0, post_iter_func=lambda item: item[1],
                buffer_size_bytes=self.bucket_bytes, num_buffers=2,
            )
            torch.cuda.current_stream().synchronize()
            self.servers.wait(futures)
            self._count(bucket)

    def _close(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


class IpcWeightSender(WeightSender):
    """vLLM's `ipc` backend: trainer and engines share one GPU; buckets travel as CUDA IPC handles.

    The servers need `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (handles are pickled into JSON).
    Unverified here (no vLLM on the lent GPU machines); follows vLLM 0.32's IPC engine contract.
    """

    backend = "ipc"

    def _init(self) -> None:
        self.servers.call("init", {"init_info": {"packed": True}})

    def _push(self, named_tensors) -> None:
        import pickle

        import pybase64
        from vllm.distributed.weight_transfer.packed_tensor import packed_ipc_producer

        device = torch.accelerator.current_device_index()
        gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)

        def counted(it):
            for name, t in it:
                self._stats.tensors += 1
                self._stats.bytes += nbytes_of(t)
                yield name, (t.detach() if t.is_cuda else t.detach().cuda())

        for bucket in iter_buckets(counted(named_tensors), self.bucket_bytes):
            # One packed CUDA buffer per bucket (never a layer split across update calls).
            size = max(self.bucket_bytes, bucket_size(bucket))
            for chunk in packed_ipc_producer(
                iterator=iter(bucket), gpu_uuid=gpu_uuid, post_iter_func=lambda item: item[1],
                buffer_size_bytes=size,
            ):
                info: dict[str, Any] = {
                    "names": chunk.names, "dtype_names": chunk.dtype_names, "shapes": chunk.shapes,
                    "tensor_sizes": chunk.tensor_sizes,
                    "ipc_handles_pickled": pybase64.b64encode(pickle.dumps(chunk.ipc_handle)).decode(),
                }
                self.servers.call("update", {"update_info": info})  # the buffer is reused: wait
                self._stats.buckets += 1

    def _after_commit(self) -> None:
        torch.cuda.ipc_collect()


SENDERS: dict[str, type[WeightSender]] = {
    "shm": ShmWeightSender, "nccl": NcclWeightSender, "ipc": IpcWeightSender,
}


def make_sender(backend: str, urls: list[str] | str, **kwargs) -> WeightSender:
    """The sender for `backend` ("shm", "nccl", "ipc"); kwargs go to its constructor."""
    if backend not in SENDERS:
        raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {sorted(SENDERS)}")
    return SENDERS[backend](urls, **kwargs)
