"""Recipes: one module per command, each holding its config (on the shared `RunConfig` base) and how it builds
the parts and runs a loop: `rl` (`winnow train grpo|dr-grpo|rloo|ppo`), `preference` (`winnow train
dpo|ipo|slic|simpo`), `sft` (`winnow sft`), `eval` (`winnow eval`)."""
