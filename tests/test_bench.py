"""The GPU benchmark's code path runs on CPU at a tiny size, so it cannot rot while no GPU is at hand."""

import math

from bench import gpu


def test_gpu_benchmark_smoke():
    results = gpu.main(["--smoke"])
    assert [(r["arch"], r["mode"]) for r in results] == [
        ("sd15", "eager"), ("sd15", "checkpointing"), ("sdxl", "eager"), ("sdxl", "checkpointing"),
        ("sdxl", "lowvram")]
    assert all(r["samples_per_s"] > 0 and 0 < r["mfu"] for r in results)


def test_the_memory_estimate_counts_the_published_models():
    """bench/memory.py builds the full-size transformers on the meta device from the shipped configs: their sizes are
    the published ones, and the table's modes order as they must."""
    from bench import memory

    rows = {r["name"]: r for r in memory.main()}
    assert abs(rows["FLUX.1 dev"]["params"] / 11.9e9 - 1) < 0.005  # Black Forest Labs: 12B (11.9 B)
    assert abs(rows["SD 3.5 Large"]["params"] / 8.1e9 - 1) < 0.01  # Stability AI: 8.1B
    assert abs(rows["SD 3.5 Large"]["t5_gb"] / 2 - 4.76) < 0.05  # T5-XXL's encoder: 4.76 B parameters
    for r in rows.values():
        assert r["fp8_gb"] < r["bf16_gb"] and r["peak_fp8_ckpt"] < r["peak_bf16_ckpt"] < r["peak_bf16_ckpt"] + 1
        assert r["act_ckpt_gb"] < r["act_eager_gb"] and r["lora"] > 0
    assert rows["FLUX.1 dev"]["peak_fp8_ckpt"] < 24 < rows["FLUX.1 dev"]["peak_bf16_ckpt"]
    # the caching phase (T5-XXL 9.5 GB + CLIP, the transformer not yet on the GPU) stays under the training peak
    assert 9.5 < rows["SD 3.5 Large"]["caching_gb"] < rows["SD 3.5 Large"]["peak_fp8_ckpt"]


def test_the_flow_gpu_benchmark_smoke():
    """bench/flow_gpu.py (peak memory per mode against bench/memory.py's estimate) runs its code path on CPU."""
    from bench import flow_gpu

    results = flow_gpu.main(["--smoke", "--models", "FLUX.1 dev,SD 3.5 Medium"])
    assert [(r["model"], r["mode"]) for r in results] == [("FLUX.1 dev", "bf16"), ("FLUX.1 dev", "fp8"),
                                                          ("SD 3.5 Medium", "bf16"), ("SD 3.5 Medium", "fp8")]
    assert all(r["steps_per_s"] > 0 and r["estimate_gb"] > 0 for r in results)
    assert results[1]["estimate_gb"] < results[0]["estimate_gb"]


def test_the_gpu_paths_check_smoke():
    """bench/gpu_paths.py (every method of every family on the device, fp8, a sweep, a compare) runs its code path
    on CPU: a few rows, each ok."""
    from bench import gpu_paths

    rows = gpu_paths.main(["--smoke"])
    assert [r["row"] for r in rows] == ["sd15 lora", "sd15 loha", "flux lokr", "flux lora fp8",
                                        "sd15 sweep lora+lokr", "sd15 compare"]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert all(math.isfinite(r["loss"]) for r in rows[:5]) and rows[-1]["file"].startswith("grid.png")


def test_the_kohya_loop_benchmark_times_our_side(tmp_path):
    """bench/kohya_loop.py's own half (sd-scripts is not installed here): our trainer in a child process with the
    step stamps, torch's default AdamW asked for through optimizer_args (a config that refused `fused=False` would
    fail the child); the parts of a step add up to the step."""
    import argparse

    from bench import kohya_loop

    work = tmp_path / "work"
    for sub in ("runs", "logs"):
        (work / sub).mkdir(parents=True)
    args = argparse.Namespace(steps=kohya_loop.SKIP + 3, sd_scripts=tmp_path / "none", kohya_python=None)
    result = kohya_loop.run_variant("ours-te-loop", kohya_loop.prepare(work), args, work)
    parts = sum(result[p] for p in ("to_backward", "backward", "to_optimizer", "optimizer"))
    assert 0 < result["backward"] < result["step"] < result["first_step"] < result["wall"]
    assert math.isclose(parts, result["step"], rel_tol=1e-6)
    events = next((work / "runs").glob("ours-*/events.jsonl")).read_text().splitlines()
    assert sum('"type": "step"' in e for e in events) == args.steps
