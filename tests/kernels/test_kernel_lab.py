"""scripts/kernel_lab.py end to end at toy size on the CPU interpreter (the documented GPU command
with --smoke): checks pass, every section writes its rows, the JSON is complete."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import kernel_lab


def test_kernel_lab_smoke(tmp_path, capsys):
    out = tmp_path / "lab.json"
    assert kernel_lab.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["check"] and all(row["ok"] for row in res["check"])
    assert res["check"][-1]["det_bitwise"] is True
    (dense,) = res["dense"]
    assert {"ours_old", "ours_default", "ours_new"} <= set(dense["fb"])
    assert all(r["fb_ms"] > 0 for r in dense["fb"].values())
    assert all(v.get("err_vs_first", 0) < 1e-4 for v in {**dense["fwd"], **dense["bwd"]}.values())
    assert res["latency"]["ours_default"]["fb_ms"] > 0
    (sparse,) = res["sparse"]
    assert set(sparse["ms"]) == {"sp_det", "sp_default"}
    assert "checks failed: 0" in capsys.readouterr().out
