"""LoRA through peft: the merge by hand, base names for the engine, the reference = adapters off, only adapters
train, the sync check passes, a merged save loads, the CLI flags. The run that must learn is in
test_lora_e2e.py."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

pytest.importorskip("peft")

from winnow.algorithms import DPO, GRPO  # noqa: E402
from winnow.engines.hf import HFEngine  # noqa: E402
from winnow.learner.learner import Learner, LearnerConfig  # noqa: E402
from winnow.learner.lora import LoraConfig, apply_lora, merged_weights  # noqa: E402
from winnow.learner.batch import make_pair_batch  # noqa: E402
from winnow.loops.preference import train_pairs  # noqa: E402
from winnow.learner.sync import SyncError, sync_weights, verify_sync  # noqa: E402
from winnow.types import Completion, PreferencePair, Prompt  # noqa: E402

from test_learner import _rl_batch  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj"


def _lora_learner(model, rank=4, alpha=8.0, lr=1e-2, **lora):
    policy = apply_lora(model, LoraConfig(rank=rank, alpha=alpha, **lora))
    return Learner(policy, LearnerConfig(lr=lr), total_steps=10, device="cpu")


def test_merged_weights_are_w_plus_scaled_b_a_under_the_base_names(tiny_model):
    base_names, base_keys = dict(tiny_model.named_parameters()), set(tiny_model.state_dict())
    w = tiny_model.get_submodule(Q0).weight.detach().clone()  # [out, in]
    model = apply_lora(tiny_model, LoraConfig(rank=4, alpha=8.0))
    layer = model.get_base_model().get_submodule(Q0)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero (the merge would be W itself): give it values
        layer.lora_B["default"].weight.normal_()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, in], [out, r]
    merged = dict(merged_weights(model))
    # alpha / rank = 8 / 4 = 2
    torch.testing.assert_close(merged[f"{Q0}.weight"], w + 2.0 * b @ a, rtol=0, atol=1e-6)
    assert not torch.equal(merged[f"{Q0}.weight"], w)
    # Exactly the plain model's parameter names (tied head once, as named_parameters gives it), no peft names.
    assert list(merged) == list(base_names)
    assert set(merged) <= base_keys  # (the state dict also names the tied lm_head.weight)
    # Untargeted tensors pass through untouched, and nothing was merged into the trained model.
    torch.testing.assert_close(merged["model.embed_tokens.weight"], base_names["model.embed_tokens.weight"])
    torch.testing.assert_close(layer.get_base_layer().weight, w, rtol=0, atol=0)


def test_only_adapters_are_trained(tiny_model, tiny_tokenizer):
    learner = _lora_learner(tiny_model)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    optimized = [p for group in learner.optimizer.param_groups for p in group["params"]]
    lora_params = [p for n, p in learner.model.named_parameters() if "lora_" in n]
    assert {id(p) for p in optimized} == {id(p) for p in lora_params}
    # 2 layers x 7 projections, each A [4, in] + B [out, 4]
    assert sum(p.numel() for p in optimized) < 0.2 * sum(p.numel() for p in learner.model.parameters())
    loss_fn = partial(GRPO().loss, max_tokens=8)
    learner.train_step(_rl_batch(tiny_tokenizer), loss_fn)
    for name, param in learner.model.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name  # the base gets no gradient at all
        # B starts at 0, so A's first gradient (B^T x dL/dy) is exactly 0 and only B moves on step 1
        assert (not torch.equal(param, before[name])) == ("lora_B" in name), name
    learner.train_step(_rl_batch(tiny_tokenizer, seed=1), loss_fn)
    for name, param in learner.model.named_parameters():
        assert (not torch.equal(param, before[name])) == ("lora_" in name), name


def test_reference_is_the_base_model_exactly_and_grpo_kl_uses_it(tiny_model, tiny_tokenizer):
    base = copy.deepcopy(tiny_model)
    learner = _lora_learner(tiny_model)
    batch = _rl_batch(tiny_tokenizer)
    objective = GRPO(kl_coef=0.1)
    assert objective.needs_reference and learner.ref_model is None  # no copy of the model
    first = learner.train_policy(batch, partial(objective.loss, max_tokens=8), needs_reference=True)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # B = 0 at the start: the policy is the reference
    second = learner.train_policy(batch, partial(objective.loss, max_tokens=8), needs_reference=True)
    assert second["kl"] > 1e-6  # after a step the adapters move the policy away
    reference = learner.reference_logprobs(batch)
    assert torch.equal(reference, learner.logprobs(base, batch))  # bit for bit: the same weights, the same ops
    assert not torch.allclose(learner.logprobs(learner.model, batch), reference)  # adapters back on after


def test_online_dpo_reference_is_adapters_off(tiny_model, tiny_tokenizer):
    prompt_ids = tiny_tokenizer("12+34=", add_special_tokens=False)["input_ids"]

    def completion(text):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        return Completion(list(prompt_ids), ids, [0.0] * len(ids), "stop", text)

    pairs = [PreferencePair(Prompt("12+34=", prompt_ids), completion(c), completion(r))
             for c, r in [("46", "47"), ("4", "999")]]
    batch = make_pair_batch(pairs, tiny_tokenizer.pad_token_id)
    learner = _lora_learner(tiny_model)
    first = train_pairs(learner, batch, DPO(beta=0.1))
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference: Delta = 0, loss log 2
    second = train_pairs(learner, batch, DPO(beta=0.1))
    assert second["loss"] < first["loss"]  # the adapters moved the policy, the reference stayed


def test_check_sync_passes_after_a_lora_step(tiny_model, tiny_tokenizer):
    engine = HFEngine(copy.deepcopy(tiny_model), tiny_tokenizer, device="cpu", copy_model=False)
    learner = _lora_learner(tiny_model, lr=3e-2)
    for _ in range(3):
        learner.train_step(_rl_batch(tiny_tokenizer), partial(GRPO().loss, max_tokens=8))
    probe = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    with pytest.raises(SyncError):  # never synced: the engine still runs the base model
        verify_sync(engine, learner, probe, tolerance=1e-4)
    metrics = sync_weights(learner, engine, bucket_mb=0.01)  # several buckets
    assert metrics["sync/num_buckets"] > 1
    assert verify_sync(engine, learner, probe, tolerance=1e-4)["sync/logprob_diff_max"] < 1e-4
    assert all("lora" not in n and "base_layer" not in n for n, _ in engine.model.named_parameters())


def test_save_writes_a_merged_model_and_the_adapter(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    learner = _lora_learner(tiny_model)
    batch = _rl_batch(tiny_tokenizer)
    learner.train_step(batch, partial(GRPO().loss, max_tokens=8))
    learner.save(tmp_path / "final", tiny_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(learner.logprobs(loaded, batch), learner.logprobs(learner.model, batch),
                               rtol=0, atol=1e-5)
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()


def test_modules_to_save_are_synced_under_their_base_names(tiny_model, tiny_tokenizer):
    base_names = list(dict(tiny_model.named_parameters()))
    learner = _lora_learner(tiny_model, target_modules=["all-linear"], modules_to_save=["model.norm"])
    learner.model.get_base_model().model.norm.modules_to_save["default"].weight.data.fill_(2.0)
    merged = dict(learner.named_weights())
    assert list(merged) == base_names  # all-linear and a saved module: still the plain names
    assert torch.equal(merged["model.norm.weight"], torch.full_like(merged["model.norm.weight"], 2.0))


def test_lora_with_a_sharded_strategy_says_what_works(tiny_model):
    policy = apply_lora(tiny_model, LoraConfig(rank=4))
    with pytest.raises(ValueError, match="strategy single"):
        Learner(policy, LearnerConfig(strategy="fsdp2"), total_steps=1, device="cpu")


def test_lora_flags_on_the_cli_and_in_a_file(tmp_path):
    from winnow.algorithms import GRPO as GRPOConfig
    from winnow.config import parse
    from winnow.recipes.rl import TrainConfig

    config = parse(TrainConfig[GRPOConfig], TrainConfig(algo=GRPOConfig()),
                   ["--lora-rank", "8", "--lora-alpha", "32", "--lora-dropout", "0.05",
                    "--lora-target-modules", "q_proj", "v_proj"], prog="winnow train grpo")
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (8, 32.0, 0.05)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    config = parse(TrainConfig[GRPOConfig], TrainConfig(algo=GRPOConfig()), ["--lora.rank", "4"], prog="x")
    assert config.lora.rank == 4 and config.lora.enabled
    (tmp_path / "run.yaml").write_text("lora:\n  rank: 16\n  target_modules: [all-linear]\n")
    config = parse(TrainConfig[GRPOConfig], TrainConfig(algo=GRPOConfig()), ["--config", str(tmp_path / "run.yaml")],
                   prog="x")
    assert config.lora.rank == 16 and config.lora.target_modules == ["all-linear"]
    with pytest.raises(ValueError, match="lora.rank"):
        LoraConfig(rank=-1)


def test_missing_peft_names_the_extra(monkeypatch, tiny_model):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ImportError, match=r"pip install \"winnow\[lora\]\""):
        apply_lora(tiny_model, LoraConfig(rank=4))
    assert apply_lora(tiny_model, LoraConfig(rank=0)) is tiny_model  # off: peft is never needed
