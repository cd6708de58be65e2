"""Loops: one skeleton (`Loop`: counters, phase timer, eval schedule, log row, progress, sync with sleep/wake and
the check) and each training family's part of an iteration: `RLFamily`, `PreferenceFamily`,
`OfflinePreferenceFamily`, `SFTFamily`. They talk to the Actor and the Learner through `winnow.loops.seam`."""
from winnow.loops.base import Counters, Family, Loop, PhaseTimer
from winnow.loops.config import EvalConfig, PairConfig, RolloutConfig, WinRateConfig
from winnow.loops.offline import OfflinePreferenceFamily
from winnow.loops.preference import PreferenceFamily
from winnow.loops.rl import RLFamily
from winnow.loops.seam import Actor, LocalActor, PolicyLearner
from winnow.loops.sft import SFTFamily

__all__ = ["Actor", "Counters", "EvalConfig", "Family", "LocalActor", "Loop", "OfflinePreferenceFamily", "PairConfig",
           "PhaseTimer", "PolicyLearner", "PreferenceFamily", "RLFamily", "RolloutConfig", "SFTFamily",
           "WinRateConfig"]
