"""`pva rehearse` (its tiny size, the same code path as the SD2-size run), the memory bench and
the GPU script's smoke mode, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import REPO


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_every_stage_runs_the_real_entry_points(rehearsal):
    out, stdout = rehearsal
    state = json.loads((out / "rehearsal.json").read_text())
    stages = state["stages"]
    assert list(stages) == [
        "models",
        "data",
        "train",
        "personalize",
        "inpaint",
        "bench",
        "evaluate",
    ]
    commands = [r["command"] for s in stages.values() for r in s["runs"]]
    assert any("train.py fit --config" in c and "configs/stage1.yaml" in c for c in commands)
    for cli in ("shards build", "personalize", "inpaint", "evaluate"):
        assert any(f"pva.cli {cli}" in c for c in commands), cli
    runs = stages["train"]["runs"]
    assert [r["killed"] for r in runs] == [True, False] and "--ckpt_path" in runs[1]["command"]
    assert 2 <= stages["train"]["resumed_from_step"] < stages["train"]["final_step"] == 4
    assert all(
        r["peak_rss_gb"] > 0 and r["seconds"] > 0 for s in stages.values() for r in s["runs"]
    )
    # the authors' annotation layout went through `pva shards build`
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["source"]["landmarks"] and index["source"]["region_bbox"]
    assert not index["skipped_images"]
    for path in ("runs/stage1/adapter.safetensors", "personalized.safetensors", "inpainted.png"):
        assert (out / path).is_file(), path
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"sd-inpaint", "pva"} <= set(results["methods"])
    assert results["methods"]["pva"]["wholeface"]["n"] == 2 * 2  # 2 persons x 2 targets
    bench = stages["bench"]
    assert bench["ddim_ratio"] > 0 and bench["ft_ratio"] > 0
    report = (out / "report.md").read_text()
    assert "(killed)" in report and "Fine-tuning step" in report and "DDIM step" in report


def test_the_overlay_changes_only_what_a_cpu_needs(rehearsal):
    out, _ = rehearsal
    overlay = yaml.safe_load((out / "rehearsal.yaml").read_text())
    assert set(overlay["model"]) == {"backbone", "face_model", "timestep_draws"}
    assert set(overlay["data"]["init_args"]) == {
        "shards",
        "batch_size",
        "num_workers",
        "samples_per_epoch",
    }
    assert "precision" not in overlay["trainer"]  # bf16-mixed as configs/stage1.yaml says
    stage1 = yaml.safe_load((REPO / "configs" / "stage1.yaml").read_text())
    names = [c["class_path"] for c in overlay["trainer"]["callbacks"]]
    assert names == [c["class_path"] for c in stage1["trainer"]["callbacks"]]


def test_a_rerun_resumes_and_other_settings_are_refused(rehearsal):
    out, _ = rehearsal
    again = _run("pva.cli", "rehearse", "--size", "tiny", "--out", str(out))
    assert again.returncode == 0 and "== " not in again.stdout  # every stage was done
    other = _run("pva.cli", "rehearse", "--size", "sd2", "--out", str(out))
    assert other.returncode == 2 and "other settings" in other.stderr
