"""scripts/bench_fsdp.py --smoke: one torchrun job (gloo, 2 processes, toy GPT) timing train.py's step
under FSDP2 at one global batch; the JSON rows and the table (printed last)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_fsdp_smoke(tmp_path):
    out = tmp_path / "fsdp.json"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "scripts/bench_fsdp.py", "--smoke", "--nproc", "2", "--global-batches", "1024",
                        "--set", "parallel.prefetch=2",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["ok"] and rows[0]["nproc"] == 2 and rows[0]["accum"] == 2
    assert rows[0]["tokens_per_s_per_gpu"] > 0 and 9 < rows[0]["loss"] < 12
    assert p.stdout.rstrip().splitlines()[-1].startswith("| gpt2_tiny")  # the table comes last
