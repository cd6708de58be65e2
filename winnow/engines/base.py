"""The Engine protocol: what the Actor samples with."""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

from winnow.lazy import lazy_import
from winnow.types import Completion, SamplingParams

torch = lazy_import("torch")


@runtime_checkable
class Engine(Protocol):
    """Samples responses and takes weight updates from the learner.

    Backends: `hf` (embedded, plain PyTorch + transformers) and `vllm` (production). A backend that cannot
    free memory makes `sleep`/`wake` no-ops.
    """

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Sample `params.n` responses for each prompt (token ids). Returns `len(prompts) * params.n`
        completions, grouped by prompt: completions[i * n : (i + 1) * n] answer prompts[i]."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, is_last_bucket: bool = True) -> None:
        """Load new policy weights, named as in the learner's `model.named_parameters()`. A sync sent in
        buckets passes `is_last_bucket=False` on all calls but the last, which checks nothing was missed."""
        ...

    def sleep(self) -> None:
        """Free what memory the backend can while the learner trains."""
        ...

    def wake(self) -> None:
        """Undo `sleep` before the next `generate`."""
        ...
