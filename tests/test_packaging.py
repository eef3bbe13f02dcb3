"""The wheel works outside the source tree: shipped SAE, probes and pairs load from site-packages,
and `smda demo` / `smda probe` run from a directory that is not the repository."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("smda_callback-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("smda_callback/data/sae/sae_weights.safetensors", "smda_callback/data/sae/cfg.json",
                 "smda_callback/data/probes.jsonl", "smda_callback/data/pairs.jsonl", "smda_callback/data/heldout.jsonl",
                 "smda_callback/data/plants.jsonl"):
        assert need in names, need
    # a fresh venv whose only smda_callback is the wheel; third-party packages come from this env via a .pth
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.check_output([str(py), "-c", "import smda_callback, smda_callback.sae as s; "
                                     "print(smda_callback.__file__); print(s.embedded_sae_dir())"], text=True, cwd=work)
    assert all(str(site) in line for line in where.split()), where  # not the source tree
    demo = subprocess.run([str(py), "-m", "smda_callback.cli", "demo", "--limit", "3", "--skip-answers", "--out", "run"],
                          capture_output=True, text=True, timeout=900, cwd=work)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "=== SMDA findings ===" in demo.stdout and (work / "run" / "smda" / "credits.json").exists()
    probe = subprocess.run([str(py), "-m", "smda_callback.cli", "probe", "--json"], capture_output=True, text=True,
                           timeout=900, cwd=work)
    assert probe.returncode == 0 and '"by_category"' in probe.stdout, probe.stderr[-2000:]
