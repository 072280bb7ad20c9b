"""The GPU benchmark's code path runs on CPU at a tiny size, so it cannot rot while no GPU is at hand."""

from bench import gpu


def test_gpu_benchmark_smoke():
    results = gpu.main(["--smoke"])
    assert [(r["arch"], r["mode"]) for r in results] == [
        ("sd15", "eager"), ("sd15", "checkpointing"), ("sdxl", "eager"), ("sdxl", "checkpointing"),
        ("sdxl", "lowvram")]
    assert all(r["samples_per_s"] > 0 and 0 < r["mfu"] for r in results)
