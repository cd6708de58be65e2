"""Weight sync into vLLM's workers: the learner's tensors arrive in buckets, by reference or by handle, never pickled.

    learner bucket [(name, tensor)] ─► transport.pack ─► payload ─► collective_rpc("winnow_load_weights", payload)
                                                                      │ in every vLLM worker (WorkerExtension)
                                                                      ▼
                                    transport's receive ─► [(name, tensor)] ─► model.load_weights (layerwise reload)

One sync is `begin` (vLLM's layerwise reload set up), one `load` per bucket, `end` (layers that got no weights put
back, attention finalised): the same steps vLLM's own `reload_weights` takes in one call, spread over buckets so
the learner never builds a second full copy of the model. Transports, chosen by where vLLM's workers run:

- `by_reference`: the workers are in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker): the learner's
  tensors themselves; `load_weights` casts them.
- `cuda_ipc`: the workers are other processes on this host (vLLM's default engine-core process, tensor parallel
  > 1) and the tensors are on a GPU: each bucket is packed, already in the engine's dtype, into one buffer, and the
  workers open it through a CUDA IPC handle (a few hundred bytes per bucket over vLLM's RPC). vLLM's RPC would
  otherwise serialise tensors to host memory (~5 s per GiB measured with vLLM 0.24 on an H200).
- `shared_memory`: the workers are other processes and the tensors are on the CPU (the CPU build, a learner on
  CPU): each bucket is packed into a file in shared memory (/dev/shm) that the workers map and copy from.

A broadcast transport (NCCL, for engines on other GPUs or hosts) fits the same protocol: its payload carries the
layout, and the workers fill the buffer from a collective instead of opening a handle.

Payloads are plain dicts of str, int, bytes and lists, so vLLM's msgpack RPC carries them without
VLLM_ALLOW_INSECURE_SERIALIZATION. This module imports neither vLLM nor transformers: vLLM's workers import
`WorkerExtension` from it by name (`LLM(worker_extension_cls=...)`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Protocol

from winnow.lazy import lazy_import

torch = lazy_import("torch")

WORKER_EXTENSION = f"{__name__}.WorkerExtension"
"""the `worker_extension_cls` value that adds winnow's sync methods to vLLM's workers"""

ALIGNMENT = 256
"""byte alignment of every tensor in a packed bucket (a view of any dtype, and aligned loads, need it)"""

Bucket = list[tuple[str, "torch.Tensor"]]


# ------------------------------------------------------------------------------------------------ packing


def plan_layout(bucket: Bucket, dtype: torch.dtype | None = None) -> tuple[list[dict[str, Any]], int]:
    """Where each tensor goes in one packed buffer: [{"name", "dtype", "shape", "offset"}] and the total bytes.

    `dtype` casts every floating-point tensor (the engine's dtype: bf16 halves an fp32 learner's bytes); None
    keeps each tensor's own. Offsets are multiples of ALIGNMENT."""
    layout, offset = [], 0
    for name, tensor in bucket:
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        layout.append({"name": name, "dtype": str(target).removeprefix("torch."), "shape": list(tensor.shape),
                       "offset": offset})
        nbytes = tensor.numel() * target.itemsize
        offset += math.ceil(nbytes / ALIGNMENT) * ALIGNMENT
    return layout, offset


def tensor_views(buffer: torch.Tensor, layout: list[dict[str, Any]]) -> Bucket:
    """The tensors of a packed bucket, as views of `buffer` (uint8, [num_bytes]); no copies."""
    views = []
    for slot in layout:
        dtype = getattr(torch, slot["dtype"])
        nbytes = math.prod(slot["shape"]) * dtype.itemsize
        views.append((slot["name"], buffer[slot["offset"] : slot["offset"] + nbytes].view(dtype).view(slot["shape"])))
    return views


def pack_into(buffer: torch.Tensor, bucket: Bucket, layout: list[dict[str, Any]]) -> None:
    """Copy (and cast) each tensor of `bucket` into its slot of `buffer`."""
    for (_, view), (_, tensor) in zip(tensor_views(buffer, layout), bucket):
        view.copy_(tensor.detach())


# ------------------------------------------------------------------------------------------------ transports


class Transport(Protocol):
    """How one bucket reaches the workers: `pack` makes the RPC payload, `release` frees what it held once the
    workers have loaded the bucket (the RPC returned)."""

    name: str

    def pack(self, bucket: Bucket) -> dict[str, Any]: ...

    def release(self) -> None: ...


class ByReference:
    """Workers in this process: the payload holds the tensors themselves (vLLM's in-process RPC passes them as
    they are)."""

    name = "by_reference"

    def pack(self, bucket: Bucket) -> dict[str, Any]:
        return {"kind": self.name, "tensors": [(name, tensor.detach()) for name, tensor in bucket]}

    def release(self) -> None:
        pass


class CudaIpc:
    """Workers in other processes on this host, tensors on a GPU: one buffer per bucket, opened by handle.

    The buffer stays referenced here until `release` (after the RPC returned); PyTorch's IPC reference counts
    keep its memory from being reused while a worker still holds views of it (vLLM's layerwise reload buffers a
    layer's weights until the layer is complete, which can span two buckets)."""

    name = "cuda_ipc"

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self._held: list[torch.Tensor] = []

    def pack(self, bucket: Bucket) -> dict[str, Any]:
        layout, num_bytes = plan_layout(bucket, self.dtype)
        buffer = torch.empty(num_bytes, dtype=torch.uint8, device=bucket[0][1].device)
        pack_into(buffer, bucket, layout)
        self._held.append(buffer)
        return {"kind": self.name, "layout": layout, "handle": cuda_ipc_handle(buffer)}

    def release(self) -> None:
        self._held.clear()
        torch.cuda.ipc_collect()  # frees blocks the workers have let go of


class SharedMemory:
    """Workers in other processes, tensors on the CPU: one file in shared memory (/dev/shm) per bucket, which the
    workers map, copy from and drop; deleted here once the RPC returned. (Files rather than
    `multiprocessing.shared_memory`, whose resource tracker would also unlink the segment from the workers.)"""

    name = "shared_memory"

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self._held: list[str] = []

    def pack(self, bucket: Bucket) -> dict[str, Any]:
        import tempfile

        layout, num_bytes = plan_layout(bucket, self.dtype)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(prefix="winnow-sync-", dir=folder, delete=False) as f:
            f.truncate(max(num_bytes, 1))
            path = f.name
        self._held.append(path)
        buffer = torch.from_file(path, shared=True, size=num_bytes, dtype=torch.uint8)
        pack_into(buffer, bucket, layout)
        return {"kind": self.name, "layout": layout, "path": path, "num_bytes": num_bytes}

    def release(self) -> None:
        for path in self._held:
            os.unlink(path)
        self._held.clear()


def choose_transport(is_in_process: bool, device: torch.device, dtype: torch.dtype | None) -> Transport:
    """The transport for workers in this process or not, and tensors on `device` (the learner's)."""
    if is_in_process:
        return ByReference()
    if device.type == "cuda":
        return CudaIpc(dtype)
    return SharedMemory(dtype)


# ------------------------------------------------------------------------------------------------ CUDA IPC handles


def cuda_ipc_handle(buffer: torch.Tensor) -> dict[str, Any]:
    """A handle to `buffer` (CUDA, uint8) that another process on this host can open: the fields of PyTorch's
    `reduce_tensor` that are plain values, and the GPU's UUID (device indices differ between processes)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _, ref_counter_handle,
     ref_counter_offset, event_handle, event_sync_required) = args
    return {"gpu_uuid": str(torch.cuda.get_device_properties(device).uuid), "size": list(size),
            "stride": list(stride), "offset": offset, "handle": handle, "storage_bytes": storage_bytes,
            "storage_offset": storage_offset, "ref_counter_handle": ref_counter_handle,
            "ref_counter_offset": ref_counter_offset, "event_handle": event_handle,
            "event_sync_required": event_sync_required}


def open_cuda_ipc(h: dict[str, Any]) -> torch.Tensor:
    """The buffer a `cuda_ipc_handle` names, mapped into this process on the GPU with the same UUID."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    if h["gpu_uuid"] not in uuids:
        raise RuntimeError(f"CUDA IPC: the learner's GPU {h['gpu_uuid']} is not visible to this vLLM worker "
                           f"(sees {uuids}); CUDA IPC needs the engine on the learner's host and GPUs")
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(h["size"]), tuple(h["stride"]), h["offset"], torch.storage.TypedStorage,
        torch.uint8, uuids.index(h["gpu_uuid"]), h["handle"], h["storage_bytes"], h["storage_offset"], False,
        h["ref_counter_handle"], h["ref_counter_offset"], h["event_handle"], h["event_sync_required"])


# ------------------------------------------------------------------------------------------------ worker side


def receive(payload: dict[str, Any], device: torch.device) -> Bucket:
    """The (name, tensor) pairs a payload carries, as the worker on `device` sees them."""
    kind = payload["kind"]
    if kind == ByReference.name:
        return list(payload["tensors"])
    if kind == CudaIpc.name:
        buffer = open_cuda_ipc(payload["handle"])
        if buffer.device != device:
            # A tensor-parallel worker on another GPU than the learner's: one peer copy of the whole bucket onto
            # this worker's GPU, so vLLM's weight loaders copy within one device. On an H200 pair, copying into
            # vLLM's parameters straight from the other GPU's buffer failed with "CUDA error: invalid argument"
            # once the engine had synced without sleeping in between.
            buffer = buffer.to(device)
            torch.cuda.synchronize(device)  # done before the handle closes and the sender frees its buffer
        return tensor_views(buffer, payload["layout"])
    if kind == SharedMemory.name:
        buffer = torch.from_file(payload["path"], shared=False, size=payload["num_bytes"], dtype=torch.uint8)
        # Copied out (onto the worker's device) so nothing maps the file once this returns: a layerwise reload
        # keeps a layer's tensors until the layer is complete, possibly past this bucket.
        return [(name, view.to(device, copy=True)) for name, view in tensor_views(buffer, payload["layout"])]
    raise ValueError(f"unknown weight-sync payload kind {kind!r}")


TIED_HEAD = "lm_head.weight"


def load_skipped_head(model: Any, bucket: Bucket, loaded: set[str]) -> None:
    """Load the LM head through its own weight loader when the bucket carries it and the model's `load_weights`
    skipped it.

    Models that tie the head to the embedding either make them one module or give the head its own module that
    shares the embedding's Parameter; some of the latter skip `lm_head.*` in `load_weights` (vLLM 0.28's Qwen2),
    so the head's layer is never re-processed. Where the backend derives kernels from the
    weight when it loads (the CPU build packs it into a oneDNN handle), the head would then keep computing
    logits from the old weights while the shared Parameter holds the new ones."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or TIED_HEAD in loaded:
        return
    for name, tensor in bucket:
        if name == TIED_HEAD:
            weight_loader = getattr(weight, "weight_loader", None)
            if weight_loader is None:
                weight.data.copy_(tensor)
            else:
                weight_loader(weight, tensor)


class WorkerExtension:
    """Methods added to every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`), called through
    `LLM.collective_rpc`. `self` is vLLM's worker: `self.model_runner.get_model()`, `self.device` and
    `self.vllm_config` exist on the GPU and CPU workers of the supported versions."""

    def winnow_worker_pid(self) -> int:
        return os.getpid()

    def winnow_begin_weight_sync(self, layerwise: bool = True) -> None:
        """Start a sync. `layerwise` uses vLLM's layerwise reload (each layer re-processed once all its weights
        arrived: right where the backend repacks weights, as the CPU build does); otherwise weights are copied
        straight into the parameters by the model's `load_weights` (faster; only for backends that use the
        checkpoint's layout as is)."""
        self._winnow_layerwise = layerwise
        if layerwise:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            with torch.device(self.device):
                initialize_layerwise_reload(self.model_runner.get_model())

    def winnow_load_weights(self, payload: dict[str, Any]) -> int:
        """Load one bucket; returns the number of tensors received."""
        bucket = receive(payload, self.device)
        model = self.model_runner.get_model()
        with torch.device(self.device):
            loaded = model.load_weights(iter(bucket)) or set()
            load_skipped_head(model, bucket, loaded)
        return len(bucket)

    def winnow_end_weight_sync(self) -> None:
        if getattr(self, "_winnow_layerwise", False):
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            with torch.device(self.device):
                finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the senders free their buffers when this returns
