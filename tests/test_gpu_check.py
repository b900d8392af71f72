"""benchmarks/gpu_check.py on the CPU: the same script a GPU runs, small, so that it cannot rot."""
import sys

from conftest import REPO


def test_gpu_check_passes_on_the_cpu(capsys, tiny_model_dir):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 34 and all(line.startswith("PASS") for line in lines), out
    sdxl = [line for line in lines if "sdxl: " in line]  # tiny-xl: every entry point and each method's edit
    assert len(sdxl) == 12 and any("sdxl: train.py" in line for line in sdxl), out
    assert "resume" in out and "dragdiffusion.evaluate" in out and "app edit function" in out
    for method in ("gooddrag", "dragnoise", "freedrag", "fastdrag", "gooddrag+text"):
        assert f"method={method} data=" in out and f"app edit function method={method}" in out
