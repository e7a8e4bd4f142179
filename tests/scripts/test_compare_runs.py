"""scripts/compare_runs.py on hand-made metrics.jsonl files: the relative differences it reports,
the exit code of --max-rel, the plot."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_runs


def _run(folder: Path, losses, tps=1000.0):
    folder.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": v, "tokens_per_s": tps} for i, v in enumerate(losses)]
    rows.append({"step": len(losses), "val_loss": 3.0})  # an eval-only row is ignored
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_compare_runs(tmp_path, capsys):
    a = _run(tmp_path / "eager", [4.0, 3.0, 2.0])
    b = _run(tmp_path / "fast", [4.0, 3.03, 2.0], tps=2000.0)  # 1% off at step 2
    png = tmp_path / "c.png"
    assert compare_runs.main([a, b, "--out", str(png), "--json", str(tmp_path / "c.json")]) == 0
    res = json.loads((tmp_path / "c.json").read_text())["fast"]
    assert res["at_step"] == 2 and abs(res["max_rel"] - 0.01) < 1e-12 and res["steps"] == 3
    assert res["tokens_per_s"] == 2000.0 and png.stat().st_size > 1000
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fast")  # the table comes last
    assert compare_runs.main([a, b, "--max-rel", "0.005"]) == 1
    assert compare_runs.main([a]) == 2
