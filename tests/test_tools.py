"""The GPU-session scripts under tools/ (their GPU steps run only on a GPU
machine): they parse, and the sources' sum that names a prebuilt CUDA build
is the one gpu_check.sh compares (sha256 of setup.py, csrc/*.* and
csrc/kernels/*.* in C order; the current names sort alike in every locale,
so that gpu_check.sh fixes the order (LC_ALL=C) is not tested here)."""
import glob
import hashlib
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scripts_parse():
    for s in ("tools/gpu_check.sh", "tools/prebuild_for_device.sh"):
        r = subprocess.run(["bash", "-n", s], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)


def test_sources_sum():
    files = ["setup.py"] + sorted(glob.glob("csrc/*.*", root_dir=REPO)) + \
        sorted(glob.glob("csrc/kernels/*.*", root_dir=REPO))
    h = hashlib.sha256()
    for f in files:
        with open(os.path.join(REPO, f), "rb") as fh:
            h.update(fh.read())
    r = subprocess.run(["bash", "tools/gpu_check.sh", "sum"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == h.hexdigest()[:16], (r.stdout, r.stderr)
