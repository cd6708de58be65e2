"""The split placement's weight broadcast: learner rank 0 sends the full weights to every engine replica in
buckets, over a process group made for the purpose (gloo on CPU, NCCL on GPU).

The group is separate from the learner ranks' own torch.distributed world (a process has one default group,
and the replicas are not in it): a `TCPStore` on learner rank 0's node and a `ProcessGroupGloo` /
`ProcessGroupNCCL` built on it directly, with rank 0 = learner rank 0 and ranks 1..N = the replicas. When a
replica is restarted, every member leaves and a new group (a new port) is formed.

Wire format, per bucket: a header (its length, then the pickled list of (name, shape, dtype) and whether it is
the last bucket), then one flat uint8 tensor holding the bucket's tensors back to back. The header makes the
stream self-describing: replicas need no layout up front, and any dtype travels as bytes.
"""
from __future__ import annotations

import datetime
import pickle
import socket
import time
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from winnow.learner.sync import iter_buckets

TIMEOUT = datetime.timedelta(minutes=10)
"""a member that never joins or never sends fails the others after this long, instead of hanging"""


def free_address() -> tuple[str, int]:
    """This node's IP address and a free TCP port on it (where the group's store will listen)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return _node_ip(), port


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (a plain process in a test): this machine
        return "127.0.0.1"


class BroadcastGroup:
    """One member of a weight-broadcast group (rank 0 sends, the others receive)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, device: torch.device):
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=TIMEOUT)
        store = dist.PrefixStore(f"winnow-weights-{port}", store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = TIMEOUT
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)
        self._store = store
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = device if backend == "nccl" else torch.device("cpu")

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        self.group.broadcast([tensor], options).wait()
        return tensor

    # ------------------------------------------------------------------ rank 0

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
             dtype: torch.dtype | None = None) -> dict[str, float]:
        """Broadcast `named_tensors` bucket by bucket (rank 0). `dtype` casts every floating-point tensor before it
        is sent: the engines' dtype (bf16 halves an fp32 learner's bytes; the engines would cast on loading
        anyway, so they end with the same weights). Returns `sync/seconds`, `sync/num_buckets`, `sync/bytes`
        (bytes sent once; every replica receives them)."""
        start = time.perf_counter()
        num_buckets = num_bytes = 0
        if dtype is not None:
            named_tensors = ((name, t.to(dtype) if t.is_floating_point() else t) for name, t in named_tensors)
        pending = None  # one bucket of look-ahead, so the last header can say it is the last
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            if pending is not None:
                num_bytes += self._send_bucket(pending, is_last=False)
                num_buckets += 1
            pending = bucket
        if pending is None:
            raise RuntimeError("the learner has no weights to broadcast")
        num_bytes += self._send_bucket(pending, is_last=True)
        num_buckets += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"sync/seconds": time.perf_counter() - start, "sync/num_buckets": float(num_buckets),
                "sync/bytes": float(num_bytes)}

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], is_last: bool) -> int:
        layout = [(name, tuple(t.shape), t.dtype) for name, t in bucket]
        header = torch.frombuffer(bytearray(pickle.dumps((layout, is_last))), dtype=torch.uint8)
        self._broadcast(torch.tensor([header.numel()], dtype=torch.long, device=self.device))
        self._broadcast(header.to(self.device))
        flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device) for _, t in bucket])
        self._broadcast(flat)
        return flat.numel()

    # ------------------------------------------------------------------ ranks 1..N

    def receive(self) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
        """The buckets rank 0 sends, as ([(name, tensor)], is_last), until the last one."""
        while True:
            length = self._broadcast(torch.zeros(1, dtype=torch.long, device=self.device))
            header = self._broadcast(torch.zeros(int(length), dtype=torch.uint8, device=self.device))
            layout, is_last = pickle.loads(header.cpu().numpy().tobytes())
            sizes = [_nbytes(shape, dtype) for _, shape, dtype in layout]
            flat = self._broadcast(torch.empty(sum(sizes), dtype=torch.uint8, device=self.device))
            tensors, offset = [], 0
            for (name, shape, dtype), size in zip(layout, sizes):
                tensors.append((name, flat[offset:offset + size].view(dtype).view(shape)))
                offset += size
            yield tensors, is_last
            if is_last:
                return

    def close(self) -> None:
        """Leave the group (its members leave together before a new one is formed)."""
        if self.backend == "nccl" and hasattr(self.group, "shutdown"):
            self.group.shutdown()
        self.group = None


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()
