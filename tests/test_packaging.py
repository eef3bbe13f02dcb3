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


def test_runtime_imports_no_lab_and_cli_help_imports_no_torch():
    """The house: `from smda_callback import SMDACallback` loads the runtime only (no lab, trl, datasets,
    matplotlib); `smda --help` loads no torch; the import graph has no circles and no private cross-module names."""
    code = ("import sys; from smda_callback import SMDACallback, load_ledger, SMDAConfig; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('trl', 'datasets', 'matplotlib') "
            "or m.startswith('smda_callback.lab') or m.startswith('smda_callback.cli')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
    code = ("import sys\nfrom smda_callback.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("NO_TORCH") and "usage: smda" in out.stdout, out.stderr[-2000:]


def test_import_graph_has_no_circles_and_no_private_names_across_modules():
    import ast

    pkg = ROOT / "smda_callback"
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, f in mods.items():
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)] + ([node.module] if node.module else [])
                target = ".".join(base)
                for cand in [target] + [f"{target}.{a.name}" for a in node.names]:
                    if cand in mods and cand != m and not cand.startswith(m + "."):
                        edges[m].add(cand)
                private += [(m, target, a.name) for a in node.names if a.name.startswith("_")]
    assert not private, private
    state: dict[str, int] = {}
    cycles = []

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in edges[u]:
            if state.get(v) == 1:
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = 2

    for m in mods:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    runtime = [m for m in mods if not m.startswith(("smda_callback.lab", "smda_callback.cli"))]
    assert not [(m, v) for m in runtime for v in edges[m] if v.startswith(("smda_callback.lab", "smda_callback.cli"))]


def test_the_callback_stays_glue():
    """Issue 22's rule: the callback moves data between the Trainer and the pieces; its logic lives in tracker,
    credit, snapshot, sinks and schema (unit-tested without a Trainer)."""
    from pathlib import Path

    import smda_callback

    src = (Path(smda_callback.__file__).parent / "callback.py").read_text(encoding="utf-8")
    assert len(src.splitlines()) <= 250
    for name in ("decompose_step", "fit_baseline", "np.linalg", "json.dumps", "add_scalar"):
        assert name not in src, f"callback.py does {name} itself"
