"""The graphs engine's decode kernels built for an H200 (sm_90) on the CPU, at the shapes of TinyLLaVA-3.2B's
decode step (experiments/gpu/hopper_build.py): they build with PDL on, the program counts their tunings assume
fit on an SM, and their loads are what the H200 measurements took them to be. Running them is the GPU
machine's job (tests/test_triton_kernels.py there); these catch, before GPU time is spent, a kernel or a
variant that does not build for Hopper, or a change that quietly costs occupancy or load width."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu" / "hopper_build.py"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every kernel the script builds, by name. A process of its own: the suite's kernels are Triton's
    interpreter's (conftest.py), and the script builds the compiled ones."""
    report = tmp_path_factory.mktemp("hopper") / "builds.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--json", str(report)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gemv merged" in result.stdout and all(len(line) <= 80 for line in result.stdout.splitlines())
    return json.loads(report.read_text())["builds"]


def tile_bytes_per_thread(build):
    constants = build["constants"]
    return constants["BLOCK_N"] * constants["BLOCK_K"] * 2 // (32 * build["warps"])


GEMVS = ("merged", "dense", "fc2")


@pytest.mark.slow
def test_no_kernel_spills_registers(builds):
    """No kernel, engine or variant, spills registers to local memory (the merging split-KV variant uses all
    255)."""
    assert {name: build["local"] for name, build in builds.items() if build["local"]} == {}


@pytest.mark.slow
def test_every_decode_kernel_waits_for_the_kernel_before_it_before_it_reads(builds):
    """Under PDL a kernel starts while the one before it is still running, so it may read nothing that kernel
    writes before `gdc_wait`: in every engine kernel, the wait comes before the first global load. And each lets
    the next one be scheduled (`gdc_launch_dependents`) after its first load, before it ends: the Mamba-2 step
    did not until session 20, so the out_proj GEMV after it could not start until it had ended. The prefetch
    variants are the exception they are built to be: their first load (weights, which no kernel writes) comes
    before the wait."""
    engine = [name for name in builds if not name.startswith("prefetch")]
    assert {"split_kv", "combine", "write_token", "mamba2_step", *(f"gemv {p}" for p in GEMVS)} <= set(engine)
    for name in engine:
        build = builds[name]
        assert 0 <= build["wait"] < build["first_load"] < build["trigger"], name
    for product in GEMVS:
        build = builds[f"prefetch {product}"]
        assert 0 <= build["first_load"] < build["wait"], product


@pytest.mark.slow
def test_gemv_streams_its_weights_in_full_width_loads_with_eight_programs_an_sm(builds):
    """The engine's GEMV on the teacher's three products: at least 8 programs fit on an SM (the premise of
    gemv.tiles' rule); the weights come in loads as wide as the tile allows, 16 bytes a thread, or the tile's
    whole share where that is less: straight into registers where the tile has one stage (q/k/v and fc1 as one
    product), as copies into shared memory (cp.async) where it is pipelined (dense and fc2, 4 stages)."""
    stages = {}
    for product in GEMVS:
        build = builds[f"gemv {product}"]
        constants = build["constants"]
        stages[product] = constants["STAGES"]
        assert build["programs_per_sm"] >= 8, (product, build["registers"], build["shared"])
        widest = min(16, tile_bytes_per_thread(build))
        if constants["STAGES"] == 1:
            assert (build["widest_load"], build["widest_copy"]) == (widest, 0), build["loads"]
        else:
            assert build["widest_copy"] == widest, build["loads"]
            in_flight = (constants["STAGES"] - 1) * constants["BLOCK_N"] * constants["BLOCK_K"] * 2
            assert build["shared"] >= in_flight, (product, build["shared"])
    assert sorted(stages.values()) == [1, 4, 4], stages


@pytest.mark.slow
def test_gemv_with_three_stages_pipelines_its_weights_through_shared_memory(builds):
    """With 3 stages (what experiments/gpu/gemv_probe.py sweeps), the weight loads become copies into shared
    memory (cp.async: LDGSTS in SASS) as wide as the tile allows, with room for at least two tiles in flight,
    and 8 programs still fit on an SM."""
    for product in GEMVS:
        build = builds[f"gemv 3 stages {product}"]
        constants = build["constants"]
        assert constants["STAGES"] == 3
        assert build["widest_copy"] == min(16, tile_bytes_per_thread(build)), build["loads"]
        assert build["shared"] >= 2 * constants["BLOCK_N"] * constants["BLOCK_K"] * 2, (product, build["shared"])
        assert build["programs_per_sm"] >= 8, (product, build["registers"], build["shared"])


@pytest.mark.slow
def test_split_kv_attention_fits_the_programs_per_sm_it_is_tuned_for(builds):
    """Batch-1 split-KV attention at 8k: one program per (KV head, slice), at most TUNING's programs per SM of
    them in all (8 on an H200's 132 SMs), and that many fit on an SM at once, so they all run in one wave; K and
    V come through shared memory (the loop has a tl.dot, so Triton pipelines it) in 16-byte copies. The variant
    whose last program merges the slices fits as many."""
    from matvlm_cli.kernels.attention import TUNING

    split = builds["split_kv"]
    batch, kv_heads, splits = split["grid"]
    assert (batch, kv_heads) == (1, 32) and batch * kv_heads * splits <= TUNING["programs_per_sm"] * 132
    for name in ("split_kv", "split_kv, merging"):
        assert builds[name]["programs_per_sm"] >= TUNING["programs_per_sm"], (name, builds[name]["registers"])
        assert builds[name]["widest_copy"] == 16, builds[name]["loads"]
    assert builds["combine"]["grid"] == [1, 32]

