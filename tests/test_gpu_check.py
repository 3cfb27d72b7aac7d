"""tests/gpu_check.py --dry-run: every code path of the GPU check, on the CPU at tiny sizes, so that the GPU run never
meets a bug a CPU could have found."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out" / "gpu_check_dry_run.json"
    images = ["gpu_check_sdxl_diffusers.png", "gpu_check_sdxl_ours.png"]          # sdxl_generate's two images
    assert os.listdir(tmp_path) == ["out"] and sorted(os.listdir(tmp_path / "out")) == [out.name, *images]
    from PIL import Image
    assert all(Image.open(tmp_path / "out" / name).size == (64, 64) for name in images)
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
    assert parts["sdxl_generate"]["share_over_0_05"] == 0 and parts["sdxl_generate"]["mean_abs_diff"] < 1e-4
    assert parts["sdxl_train"]["fits"] == "yes"
    assert parts["fid"]["images_per_s"] > 0 and parts["toy2d"]["cpu_wall_s"] > 0
    assert "| imagenet64 | ok |" in proc.stdout

    assert 0.38 < im["full_size_pflop_per_iteration_at_280"] < 0.42       # 1.44 TFLOP per image at full size


def load_gpu_check():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tests", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_part_over_its_cap_still_reports_its_partial_figures(monkeypatch):
    """A part that runs over its cap reports what it had kept (keep_partial), e.g. the toy's CUDA time when the CPU
    run that follows is the one that runs over."""
    gpu_check = load_gpu_check()

    def over_cap(cmd, timeout):
        result = cmd[cmd.index("--result") + 1]
        with open(result + ".partial", "w") as f:
            json.dump({"cuda_wall_s": 12.5}, f)
        raise subprocess.TimeoutExpired(cmd, timeout)
    monkeypatch.setattr(gpu_check, "run_in_group", over_cap)
    status, figures, _ = gpu_check.run_part("toy2d", False, 7)
    assert status == "skipped: over its 7 s cap" and figures == {"cuda_wall_s": 12.5}


def test_a_part_over_its_cap_is_stopped_with_everything_it_started(tmp_path):
    """run_in_group kills the part's whole process group: the toy's run (a grandchild) used to run on."""
    gpu_check = load_gpu_check()
    pid_file = tmp_path / "grandchild.pid"
    grandchild = "import time; time.sleep(120)"
    child = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.run_in_group([sys.executable, "-c", child], timeout=5)
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and alive(pid):
        time.sleep(0.1)
    assert not alive(pid)


def alive(pid):
    """A process that exists and is not a zombie (killed, waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_gpu_run_without_cuda_or_with_nothing_to_run_is_refused_before_anything_is_written(tmp_path):
    script = os.path.join(ROOT, "tests", "gpu_check.py")
    run = lambda *a: subprocess.run([sys.executable, script, *a], cwd=tmp_path, capture_output=True, text=True,
                                    timeout=120)
    proc = run()
    assert proc.returncode == 2 and "no CUDA device: run with --dry-run on a CPU" in proc.stderr
    for parts in (",", "fid,fid"):
        proc = run("--dry-run", "--parts", parts)
        assert proc.returncode == 2 and "give each part once, at least one" in proc.stderr
    (tmp_path / "results").mkdir()
    proc = run("--dry-run", "--parts", "fid", "--out", "results")
    assert proc.returncode == 2 and "--out results: is a folder" in proc.stderr
    assert os.listdir(tmp_path) == ["results"] and os.listdir(tmp_path / "results") == []


def test_part_keeps_partial_figures_as_it_goes(tmp_path):
    """The child process of one part writes its figures so far beside its result (here the dry toy run's)."""
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--part", "toy2d", "--dry-run",
                           "--result", str(result)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    partial = json.loads((tmp_path / "result.json.partial").read_text())
    assert partial["cpu_wall_s"] > 0 and json.loads(result.read_text())["cpu_wall_s"] == partial["cpu_wall_s"]


def test_cap_and_budget_options_refuse_what_they_cannot_use():
    for bad in ["toy2d", "nope=5", "toy2d=0", "toy2d=1.5"]:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--cap", bad],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--cap" in proc.stderr and bad in proc.stderr, (bad, proc.stderr)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--budget", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--budget must be at least 1" in proc.stderr
