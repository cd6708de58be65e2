"""The vllm engine's weight-sync transports (winnow/engines/vllm_sync.py), without vLLM: bucket layout, packing,
and each transport's payload read back as a worker reads it. The engine-level tests (a real vLLM, in this process
and in another) are in test_vllm_engine.py."""
from __future__ import annotations

import pytest
import torch

from winnow.engines.vllm_sync import (
    ALIGNMENT,
    ByReference,
    CudaIpc,
    SharedMemory,
    choose_transport,
    load_skipped_head,
    pack_into,
    plan_layout,
    receive,
    tensor_views,
)


def bucket():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(3, 5, generator=g)),          # 15 fp32: 60 bytes -> one 256-byte slot
            ("b.bias", torch.randn(7, generator=g)),                # 7 fp32
            ("c.weight", torch.randn(20, 16, generator=g)),         # 320 fp32: 1280 bytes -> 5 slots
            ("steps", torch.arange(4, dtype=torch.int64))]          # not floating point: never cast


def test_layout_aligns_every_tensor_and_casts_floats_only():
    layout, num_bytes = plan_layout(bucket(), torch.bfloat16)
    # bf16 halves the floats: a 30 B, b 14 B, c 640 B (3 slots of 256), steps 32 B; each starts on a slot.
    assert [slot["offset"] for slot in layout] == [0, 256, 512, 512 + 768]
    assert num_bytes == 512 + 768 + 256
    assert [slot["dtype"] for slot in layout] == ["bfloat16", "bfloat16", "bfloat16", "int64"]
    assert all(slot["offset"] % ALIGNMENT == 0 for slot in layout)
    assert plan_layout(bucket())[0][0]["dtype"] == "float32"  # no dtype: each tensor keeps its own


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_pack_then_views_give_back_the_tensors(dtype):
    tensors = bucket()
    layout, num_bytes = plan_layout(tensors, dtype)
    buffer = torch.full((num_bytes,), 0xFF, dtype=torch.uint8)  # poisoned: every slot must be written
    pack_into(buffer, tensors, layout)
    views = tensor_views(buffer, layout)
    assert [name for name, _ in views] == [name for name, _ in tensors]
    for (_, view), (_, tensor) in zip(views, tensors):
        expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert view.dtype == expected.dtype and view.shape == expected.shape
        assert torch.equal(view, expected)  # the cast on packing is the same rounding load_weights would do


def test_by_reference_hands_over_the_tensors_themselves():
    tensors = bucket()
    transport = choose_transport(is_in_process=True, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert isinstance(transport, ByReference)
    received = receive(transport.pack(tensors), torch.device("cpu"))
    assert all(r.data_ptr() == t.data_ptr() for (_, r), (_, t) in zip(received, tensors))  # no copies


def test_shared_memory_round_trip_and_release():
    import os

    tensors = bucket()
    transport = choose_transport(is_in_process=False, device=torch.device("cpu"), dtype=None)
    assert isinstance(transport, SharedMemory)
    payload = transport.pack(tensors)
    # Only plain values cross vLLM's msgpack RPC: no tensors, no pickled objects.
    assert set(payload) == {"kind", "layout", "path", "num_bytes"} and isinstance(payload["path"], str)
    received = receive(payload, torch.device("cpu"))  # a worker maps the file and copies out
    for (name, r), (expected_name, t) in zip(received, tensors):
        assert name == expected_name and torch.equal(r, t)
    transport.release()
    assert not os.path.exists(payload["path"])  # deleted by the sender
    assert torch.equal(received[2][1], tensors[2][1])  # the worker's copies outlive the file


def test_cuda_tensors_in_another_process_go_by_ipc_handle():
    transport = choose_transport(is_in_process=False, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    assert isinstance(transport, CudaIpc)


def test_unknown_payload_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown weight-sync payload kind"):
        receive({"kind": "carrier-pigeon"}, torch.device("cpu"))


class TiedHeadModel(torch.nn.Module):
    """The shape of vLLM's tied-head models where the head is its own module sharing the embedding's Parameter;
    the head's weight loader counts its calls, as the layer a layerwise reload re-processes would see them."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(4, 2)
        self.lm_head = torch.nn.Module()
        self.lm_head.weight = self.embed_tokens.weight
        self.head_loads = 0

        def weight_loader(param, tensor):
            self.head_loads += 1
            param.data.copy_(tensor)

        self.lm_head.weight.weight_loader = weight_loader


def test_a_head_the_model_skipped_is_loaded_through_its_own_loader():
    model, new = TiedHeadModel(), torch.arange(8.0).reshape(4, 2)
    load_skipped_head(model, [("model.embed_tokens.weight", new), ("lm_head.weight", new)], loaded=set())
    assert model.head_loads == 1 and torch.equal(model.lm_head.weight, new)
    # Loaded by the model already, or not in this bucket: left alone.
    load_skipped_head(model, [("lm_head.weight", new)], loaded={"lm_head.weight"})
    load_skipped_head(model, [("model.embed_tokens.weight", new)], loaded=set())
    assert model.head_loads == 1
