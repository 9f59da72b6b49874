"""The lint config (ruff.toml) holds for the package, configs and launch scripts: one style that
CI checks, not a convention that drifts. ruff comes with the `test` extra."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "medjax",
                           "configs", "launch"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
