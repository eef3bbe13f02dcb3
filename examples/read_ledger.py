"""Read a run's ledger with pandas and plot it with matplotlib.

    python examples/read_ledger.py runs/demo            # a finished run
    python examples/read_ledger.py --smoke              # trains a tiny run first, then reads it
"""

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from smda_callback import load_ledger  # noqa: E402
from smda_callback.ledger import load_credits  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("run_dir", nargs="?", default="runs/example")
ap.add_argument("--smoke", action="store_true")
a = ap.parse_args()
if a.smoke:
    subprocess.run([sys.executable, str(Path(__file__).with_name("sft_with_smda.py")), "--smoke", "--out", a.run_dir], check=True)

df = load_ledger(a.run_dir)  # one row per (step, feature)
print(df.groupby("label")["delta_beta"].agg(["sum", "std"]).sort_values("sum", key=abs, ascending=False).head(8))
top = df.groupby("label")["beta"].last().abs().sort_values(ascending=False).index[:6]
fig, ax = plt.subplots(figsize=(8, 4))
for lab in top:
    s = df[df.label == lab]
    ax.plot(s.step, s.beta, label=lab[:30])
ax.set_xlabel("optimizer step")
ax.set_ylabel("β")
ax.legend(fontsize=7)
out = Path(a.run_dir) / "beta.png"
fig.savefig(out, dpi=100, bbox_inches="tight")
credits = load_credits(a.run_dir)
if credits:
    worst = max(credits["pairs"], key=lambda p: p["refusal_harmless"])
    print(f"pair that raised harmless-probe refusal most ({credits['rule']} credit): #{worst.get('index')} "
          f"{worst.get('prompt', '')[:60]!r} {worst['refusal_harmless']:+.4f}")
print(f"plot: {out}")
