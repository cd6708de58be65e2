"""The Mosec stages that serve a reward model (`winnow serve-oracle --oracle.kind reward_model`) or a pairwise
preference model (`--oracle.kind pairwise`), and `pack_by_token_budget`, the forward's batching, testable without a
server.

    POST /reward, /compare ─► ModelRewardIngress / ModelCompareIngress (CPU: check, tokenise; one request each)
                           ─► RewardModelWorker × num_workers (dynamic batching of requests, then token packing)

Tokenising in the ingress keeps the tokenizer's CPU work off the worker that holds the model: the ingress
workers run while the model runs. The worker gets a dynamic batch of requests (Mosec batches by request count),
pools every row of every request, and runs the forward in *packs* chosen by `pack_by_token_budget`: rows sorted
by length, each pack padded to a multiple of `pad_bucket` tokens and holding at most `token_budget` padded tokens,
so one long row never pads a pack of short ones and the activation memory of a forward is bounded whatever the
requests look like. One row longer than the budget runs alone, padded to its own length.

A pairwise model (`winnow.oracles.pairwise`) runs on the same worker: its compare ingress tokenises each pair in
both orders, (prompt, a SEP b) then (prompt, b SEP a), and the worker's compare reply, sigmoid((s_first_half -
s_second_half) / T), is then exactly the pairwise model's P(a beats b). Its /reward route refuses every request
(422): a pairwise model gives no scalar reward.

On GPUs each worker loads the model in bf16 on its own GPU (data parallel: `serve` gives worker i GPU i mod the
GPU count). A model larger than one GPU: `--gpus-per-worker K` gives each worker K GPUs and `layer_device_map`
places its decoder layers over them in K contiguous, equal runs (pipeline parallel without micro-batch overlap:
one pack flows through the GPUs in turn, so only one GPU of a worker is busy at a time; the cost is that idle
time, about (K-1)/K of the worker's GPU time, plus one activation copy per GPU boundary, in exchange for fitting
the model at all).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from mosec import ValidationError, Worker
from mosec.mixin import MsgpackMixin

from winnow.oracles.service import CompareIngress, RewardIngress
from winnow.oracles.service_config import load_config_from_env, served_model

log = logging.getLogger(__name__)


def pack_by_token_budget(lengths: list[int], token_budget: int, pad_bucket: int = 1) -> list[tuple[list[int], int]]:
    """Packs of row indices for one forward each, and the length each pack is padded to.

    Rows go in order of length (longest first); a pack is padded to its longest row rounded up to a multiple of
    `pad_bucket` and holds as many rows as keep rows x padded length <= `token_budget`. A row whose padded length
    alone exceeds the budget runs alone, padded to its exact length (never rounded past the budget)."""
    if token_budget < 1 or pad_bucket < 1:
        raise ValueError(f"token_budget={token_budget} and pad_bucket={pad_bucket} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[tuple[list[int], int]] = []
    rows: list[int] = []
    width = 0
    for i in order:
        if rows and (len(rows) + 1) * width > token_budget:  # longest first: this row fits the pack's width
            packs.append((rows, width))
            rows = []
        if not rows:
            width = -(-lengths[i] // pad_bucket) * pad_bucket
            if width > token_budget:  # an overlong row: alone, unrounded
                packs.append(([i], lengths[i]))
                continue
        rows.append(i)
    if rows:
        packs.append((rows, width))
    return packs


def layer_device_map(model: Any, devices: list[Any]) -> dict[str, Any]:
    """A `device_map` for `from_pretrained` that splits `model`'s decoder layers (its longest `ModuleList`) into
    len(devices) contiguous runs of equal size (the first runs one longer when they don't divide), with the modules
    before the layers (embeddings) on the first device and those after (final norm, score head) on the last.
    `model` may be on the meta device: only its module names are read."""
    import torch

    layers_name, layers = max(((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)),
                              key=lambda item: len(item[1]), default=(None, None))
    if layers is None or not devices:
        raise ValueError("layer_device_map needs a model with a ModuleList of layers and at least one device")
    device_map: dict[str, Any] = {}
    runs = [len(layers) // len(devices) + (k < len(layers) % len(devices)) for k in range(len(devices))]
    index = 0
    for device, run in zip(devices, runs):
        for _ in range(run):
            device_map[f"{layers_name}.{index}"] = device
            index += 1
    seen_layers = False
    for name, module in _leaves_around(model, layers_name):
        if name == layers_name:
            seen_layers = True
        elif not seen_layers:
            device_map[name] = devices[0]
        else:
            device_map[name] = devices[-1]
    return device_map


def _leaves_around(model: Any, layers_name: str):
    """(name, module) in registration order: the layers' ModuleList itself, and the largest modules that neither
    contain it nor lie inside it (e.g. model.embed_tokens, model.layers, model.norm, model.rotary_emb, score)."""
    def walk(module: Any, prefix: str):
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if name == layers_name:
                yield name, child
            elif layers_name.startswith(name + "."):
                yield from walk(child, name + ".")
            else:
                yield name, child
    yield from walk(model, "")


def load_split_model(path: str, devices: list[Any], dtype: Any) -> Any:
    """The sequence-classification model at `path`, its layers placed over `devices` by `layer_device_map`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype,
                                                              device_map=layer_device_map(skeleton, devices))


def _load_tokenizer(path: str):
    from winnow.oracles.reward_model import load_reward_tokenizer

    return load_reward_tokenizer(path)


class _TokenizingIngress:
    """Mixed into the rule service's ingress stages: after the checks, each side's (prompt, completion) pairs
    are tokenised with `encode_pairs`, exactly as in-process scoring and `winnow train rm` do."""

    sides: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        config = served_model(load_config_from_env().oracle)
        self.tokenizer, self.max_length = _load_tokenizer(config.path), config.max_length

    def forward(self, data: Any) -> dict[str, Any]:
        request = super().forward(data)
        request["input_ids"] = self.encode(request)
        return request

    def encode(self, request: dict[str, Any]) -> list[list[int]]:
        """The rows the worker scores: each side's (prompt, completion) pairs, side after side."""
        from winnow.oracles.reward_model import encode_pairs

        return [ids for side in self.sides
                for ids in encode_pairs(self.tokenizer, request["prompts"], request[side], self.max_length)]


class ModelRewardIngress(_TokenizingIngress, RewardIngress):
    sides = ("completions",)


class ModelCompareIngress(_TokenizingIngress, CompareIngress):
    sides = ("completions_a", "completions_b")


class PairwiseCompareIngress(ModelCompareIngress):
    """Each pair in both orders (`encode_both_orders`): the worker's compare reply is the pairwise model's P."""

    def encode(self, request: dict[str, Any]) -> list[list[int]]:
        from winnow.oracles.pairwise import encode_both_orders

        return encode_both_orders(self.tokenizer, request["prompts"], request["completions_a"],
                                  request["completions_b"], self.max_length)


class PairwiseRewardIngress(RewardIngress):
    """/reward on a pairwise model: refused (422) after the usual checks; the model only compares."""

    def forward(self, data: Any) -> dict[str, Any]:
        super().forward(data)
        raise ValidationError("this service serves a pairwise preference model: it compares (POST /compare) and "
                              "gives no rewards; a client sets --oracle.remote.pairwise and uses it for preference "
                              "runs with --pairs.selection random")


class RewardModelWorker(MsgpackMixin, Worker):
    """Scores a dynamic batch of tokenised requests with the reward model, a token-budget pack at a time."""

    def __init__(self) -> None:
        super().__init__()
        import torch
        from transformers import AutoModelForSequenceClassification

        self.config = load_config_from_env()
        rm = served_model(self.config.oracle)
        is_gpu = torch.cuda.is_available()
        dtype = torch.bfloat16 if is_gpu else torch.float32
        self.device = torch.device("cuda:0" if is_gpu else "cpu")  # where the inputs go (the first stage)
        if is_gpu and torch.cuda.device_count() > 1:  # pipeline parallel over this worker's GPUs (module doc)
            model = load_split_model(rm.path, list(range(torch.cuda.device_count())), dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(rm.path, dtype=dtype).to(self.device)
        self.pad_token_id = _load_tokenizer(rm.path).pad_token_id
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.pad_token_id
        self.model = model.eval().requires_grad_(False)
        self.info = {"rewards": [] if self.config.oracle.kind == "pairwise" else ["reward_model"],
                     self.config.oracle.kind: rm.path}

    def forward(self, data: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        if isinstance(data, dict):  # max_batch_size=1: Mosec hands over the request itself
            return self.score_batch([data])[0]
        return self.score_batch(data)

    def score_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from winnow.oracles.preference import bradley_terry
        from winnow.oracles.reward_model import score_ids

        start = time.perf_counter()
        rows = [ids for r in requests if r["op"] != "health" for ids in r["input_ids"]]
        scores: list[float] = [0.0] * len(rows)
        packs = pack_by_token_budget([len(r) for r in rows], self.config.token_budget, self.config.pad_bucket)
        for indices, width in packs:
            for i, score in zip(indices, score_ids(self.model, [rows[i] for i in indices], self.pad_token_id,
                                                   self.device, length=width)):
                scores[i] = score
        metrics = {"reward_model/latency_s": time.perf_counter() - start,
                   "reward_model/requests_per_batch": float(len(requests)),
                   "reward_model/forwards": float(len(packs)),
                   "reward_model/rows_per_forward_max": float(max((len(p) for p, _ in packs), default=0)),
                   "reward_model/padded_tokens_max": float(max((len(p) * w for p, w in packs), default=0))}
        replies, offset = [], 0
        for request in requests:
            if request["op"] == "health":
                replies.append({"status": "ok", **self.info, "worker": self.worker_id})
                continue
            n = len(request["input_ids"])
            mine, offset = scores[offset:offset + n], offset + n
            if request["op"] == "reward":
                replies.append({"id": request["id"], "scores": mine, "components": {"reward_model": mine},
                                "metrics": metrics, "worker": self.worker_id})
            else:
                half = n // 2
                replies.append({"id": request["id"], "metrics": metrics, "probabilities": [
                    bradley_terry(a, b, self.config.compare_temperature) for a, b in zip(mine[:half], mine[half:])]})
        return replies
