"""The `winnow` command line.

    winnow train ALGO [--config FILE] [--flags ...]   policy iteration: RL (grpo, dr-grpo, rloo, ppo) or preference
                                                      optimisation (dpo, ipo, slic, simpo; --offline for a dataset)
    winnow sft [--config FILE] [--flags ...]          supervised fine-tuning
    winnow eval [--config FILE] [--flags ...]         held-out accuracy of a model
    winnow quickstart [--flags ...]                   tiny model, SFT warm start, GRPO, curves (CPU, minutes)
    winnow init-model [--data.train TASK|FILE] [--size tiny|small]  a small model + tokenizer for your data
    winnow plot RUN_DIR [--x counts/samples]          learning-curve PNGs of a run
    winnow serve-oracle [--config FILE] [--flags ...] an oracle as a Mosec service (pip install 'winnow[serve]')

Every command's flags come from typed config dataclasses (`winnow train grpo --help` lists them, with
their docstrings). `--config FILE` (YAML, TOML, JSON or Python) sets values first; flags override it.
"""
from __future__ import annotations

import logging
import os
import sys

USAGE = __doc__.split("\n\n")[1]


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
"""Errors in what the user gave (config, data, paths): one winnow message and exit status 2, no traceback."""


def main(argv: list[str] | None = None) -> None:
    """Run a command. A user error prints `winnow: error: MESSAGE` and exits 2; a run that a guard stopped
    (nothing trained, non-finite losses in a row, a reward function that always fails) prints
    `winnow: stopped: MESSAGE` and exits 1. `--debug` (anywhere) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    is_debug = "--debug" in argv or os.environ.get("WINNOW_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        _main(argv)
    except Exception as e:
        if is_debug:
            raise
        stopped = type(e).__name__ in ("NothingTrainedError", "NonFiniteLossError", "OracleUnavailableError",
                                         "LearnerRankDiedError")
        if not stopped and not isinstance(e, USER_ERRORS):
            raise
        print(f"winnow: {'stopped' if stopped else 'error'}: {e}\n(--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(1 if stopped else 2) from None


def _main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: winnow COMMAND ...\n\n" + USAGE + "\n\nRun `winnow COMMAND --help` for a command's flags.")
        return
    command, rest = argv[0], argv[1:]
    commands = {"train": _train, "sft": _sft, "eval": _eval, "quickstart": _quickstart, "plot": _plot,
                "serve-oracle": _serve_oracle, "init-model": _init_model}
    if command not in commands:
        raise SystemExit(f"winnow: unknown command {command!r}; choose one of: {', '.join(commands)}")
    commands[command](rest)


def _rl_trainer():
    from winnow.recipes.rl import TrainConfig, train

    return TrainConfig, train


def _preference_trainer():
    from winnow.recipes.preference import PreferenceTrainConfig, train_preference

    return PreferenceTrainConfig, train_preference


def trainers() -> dict:
    """`winnow train NAME` -> (the algorithm's config class, a function returning (run config class, train
    function)). Built on call, not at import: `serve-oracle`'s worker processes import this module, and
    should not each pay for torch."""
    from winnow.algorithms import OBJECTIVES, PREFERENCE_OBJECTIVES

    return {**{name: (cls, _rl_trainer) for name, cls in OBJECTIVES.items()},
            **{name: (cls, _preference_trainer) for name, cls in PREFERENCE_OBJECTIVES.items()}}


def _train(argv: list[str]) -> None:
    from winnow.config import parse

    registry = trainers()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: winnow train ALGO [--config FILE] [flags]\n\nALGO: {', '.join([*registry, 'rm'])}\n"
              "Run `winnow train ALGO --help` for the flags.")
        return
    name, rest = argv[0], argv[1:]
    if name == "rm":
        return _train_rm(rest)
    if name not in registry:
        raise SystemExit(f"winnow train: unknown algorithm {name!r}; choose one of: {', '.join(registry)}")
    algo_cls, trainer = registry[name]
    config_cls, train = trainer()
    config = parse(config_cls[algo_cls], config_cls(algo=algo_cls()), rest, prog=f"winnow train {name}",
                   description=" ".join((algo_cls.__doc__ or "").split()))
    run_dir = train(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(f"run written to {run_dir}")


def _train_rm(argv: list[str]) -> None:
    from winnow.config import parse
    from winnow.recipes.rm import RewardModelTrainConfig, train_reward_model

    config = parse(RewardModelTrainConfig, RewardModelTrainConfig(), argv, prog="winnow train rm",
                   description="Train a reward model (Bradley-Terry) on preference pairs.")
    run_dir = train_reward_model(config)
    if os.environ.get("RANK", "0") == "0":
        print(f"run written to {run_dir}")


def _sft(argv: list[str]) -> None:
    from winnow.config import parse
    from winnow.recipes.sft import SFTConfig, train_sft

    config = parse(SFTConfig, SFTConfig(), argv, prog="winnow sft", description="Supervised fine-tuning.")
    run_dir = train_sft(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(f"run written to {run_dir}")


def _eval(argv: list[str]) -> None:
    from winnow.config import parse
    from winnow.recipes.eval import EvalRunConfig, run_eval

    config = parse(EvalRunConfig, EvalRunConfig(), argv, prog="winnow eval",
                   description="Held-out accuracy of a model, scored by an oracle.")
    for key, value in run_eval(config).items():
        print(f"{key}: {value:.4f}")


def _quickstart(argv: list[str]) -> None:
    from winnow.config import parse
    from winnow.quickstart import QuickstartConfig, quickstart

    config = parse(QuickstartConfig, QuickstartConfig(), argv, prog="winnow quickstart",
                   description=(QuickstartConfig.__doc__ or "").strip())
    quickstart(config)


def _init_model(argv: list[str]) -> None:
    from winnow.config import parse
    from winnow.recipes.init_model import InitModelConfig, init_model

    config = parse(InitModelConfig, InitModelConfig(), argv, prog="winnow init-model",
                   description=(InitModelConfig.__doc__ or "").strip())
    print(f"model written to {init_model(config)}")


def _serve_oracle(argv: list[str]) -> None:
    from winnow.config import parse
    from winnow.oracles.serve import ServeConfig, serve

    config = parse(ServeConfig, ServeConfig(), argv, prog="winnow serve-oracle",
                   description="Serve an oracle over HTTP with Mosec: /reward, /compare, /health, /metrics.")
    serve(config)


def _plot(argv: list[str]) -> None:
    import tyro

    from winnow.logging.plot import plot_main

    for path in tyro.cli(plot_main, args=argv, prog="winnow plot"):
        print(path)


if __name__ == "__main__":
    main()
