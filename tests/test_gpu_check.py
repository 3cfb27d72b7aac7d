"""tests/gpu_check.py --dry-run: every code path of the GPU check, on the CPU at tiny sizes, so that the GPU run never
meets a bug a CPU could have found."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out" / "gpu_check_dry_run.json"
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == [out.name]   # a GPU run's file is safe
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["environment"]["torch"]
    parts = result["parts"]
    assert set(parts) == {"imagenet64", "imagenet64_compile", "imagenet64_finite", "sdxl_generate", "sdxl_train", "fid",
                          "toy2d"}
    assert all(p["status"] == "ok" for p in parts.values()), {k: p["status"] for k, p in parts.items()}
    im = parts["imagenet64"]
    assert im["images_per_s"] > 0 and im["iterations_per_s"] > 0 and im["loop_over_passes"] > 0
    assert im["gflop_per_image"] > 0
    assert parts["imagenet64_finite"]["finite"] == "yes"
    assert parts["sdxl_generate"]["max_abs_diff"] < 1e-3                                  # ours vs diffusers, tiny
    assert parts["sdxl_train"]["fits"] == "yes"
    assert parts["fid"]["images_per_s"] > 0 and parts["toy2d"]["cpu_wall_s"] > 0
    assert "| imagenet64 | ok |" in proc.stdout

    assert 0.38 < im["full_size_pflop_per_iteration_at_280"] < 0.42       # 1.44 TFLOP per image at full size
