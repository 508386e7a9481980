"""The benchmarks and research probes (``python -m benchmarks ...``), run as a user runs them.

Each runs in its smoke size: the figures mean nothing here, but every code path that prints
them runs and its output is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_bench_attention_prints_its_table():
    res = _bench("attention", "--small", "--repeats", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    for needle in (
        "PVA reference",
        "PVA fused",
        "stock (text only)",
        "attn2 layers",
        "trainable params, stage 1",
        "FLOP overhead",
    ):
        assert needle in res.stdout
    line = next(x for x in res.stdout.splitlines() if x.strip().startswith("attn2 layers"))
    assert line.split()[-1] == "16"  # SD2 has 16 cross-attention layers


def test_bench_step_prints_both_configurations():
    res = _bench("step", "--repeats", "1", "--refs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    for needle in ("tiny:", "mid:", "base UNet fwd+bwd", "PVA UNet fwd+bwd", "full PVA step"):
        assert needle in res.stdout


def test_bench_sample_prints_both_tables():
    res = _bench(
        "sample",
        "--short",
        "1",
        "--long",
        "2",
        "--cd-steps",
        "3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for needle in (
        "PVA, batched CFG",
        "StableDiffusionInpaintPipeline",
        "PVA-FT (METHOD 7)",
        "Custom-Diffusion-style",
    ):
        assert needle in res.stdout
    rows = [line for line in res.stdout.splitlines() if "PVA-FT" in line or "Custom-Diff" in line]
    assert len(rows) == 4 and sum("reused" in r for r in rows) == 2  # each method, both ways


def test_memory_bench_on_the_rehearsal_models(rehearsal):
    out, _ = rehearsal
    res = _bench(
        "memory",
        "--models",
        str(out / "models"),
        "--image-size",
        "64",
        "--options",
        "fp32,bf16-frozen+checkpointing",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith(("fp32", "bf16"))]
    assert [r[0] for r in rows] == ["fp32", "bf16-frozen+checkpointing"]
    assert all(float(r[2]) >= float(r[1]) > 0 for r in rows)  # peak >= after loading
    missing = _bench("memory", "--models", str(out / "nowhere"))
    assert missing.returncode == 2 and "pva rehearse" in missing.stderr


def test_gpu_script_smoke_run_on_cpu(tmp_path):
    res = _bench(
        "gpu",
        "--tiny",
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--out",
        str(tmp_path / "gpu.json"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert len(figures["train"]) == 5 and figures["flops_per_step"] > 0
    assert figures["personalize_s"] > 0
    assert set(figures["ddim_s_per_step"]) == {"pva", "diffusers"}
    no_gpu = _bench("gpu")  # this machine has no CUDA device: one clear line
    assert no_gpu.returncode != 0 and "no CUDA device" in no_gpu.stderr


def test_text_use_benchmark_on_the_quick_demo(quick_demo):
    from benchmarks.probes.textuse import REGIONS as BOXES
    from benchmarks.probes.textuse import text_use

    out, _ = quick_demo
    res = text_use(out, persons=2, photos_per_person=1, guidance=(1.0,), steps=2)
    # a fresh text encoder's tokens differ across positions and between the two prompts
    assert res["spread_init"]["across_positions"] > 0.1
    assert res["spread_init"]["caption_vs_plain"] > 0.1
    assert res["spread"]["caption_vs_plain"] > 0.0
    row = res["guidance"][1.0]
    for r in row.values():
        assert set(r["identity"]) == set(BOXES)
        assert all(-1.0 <= v <= 1.0 for v in r["identity"].values())
        assert 0.0 < r["masked_error"] < 1.0
    # the caption reaches the UNet: the fills differ from the plain prompt's
    assert row["caption"]["masked_error"] != row["plain"]["masked_error"]
    with pytest.raises(FileNotFoundError, match="is missing"):
        text_use(out / "models", persons=1)


def test_headroom_benchmark_on_the_quick_demo(quick_demo):
    from benchmarks.probes.headroom import BACKBONE_SAME_NOISE, FILLS, ORACLE, SAME_NOISE, headroom

    out, _ = quick_demo
    res = headroom(out, draws=1, oracle_steps=2, ddim_steps=2)
    # the generator re-creates every evaluation target exactly as the shards hold it
    assert res["rerender_error"] < 0.005
    identity = res["identity"]
    rows = {"sd-inpaint", "pva", "pva-ft40", ORACLE, SAME_NOISE, BACKBONE_SAME_NOISE, *FILLS}
    assert rows <= set(identity)
    masks = set(res["n"])
    assert masks == {"lowerface", "eyebrow", "wholeface", "random"}
    for name, per in identity.items():
        assert set(per) == masks, name
        assert all(-1.0 <= v <= 1.0 + 1e-5 for v in per.values()), name
    assert min(identity["rerender"].values()) > 0.999
    # another person's hidden attributes under the whole-face box change what the scorer sees
    assert identity["wrong hidden"]["wholeface"] < 0.999
    # the oracle row's tokens come from the attributes, not the photos: other fills
    assert identity[ORACLE] != identity[SAME_NOISE]
    with pytest.raises(FileNotFoundError, match="holds no targets"):
        headroom(out, eval_dir=out / "models")


def test_attribute_embedding_marks_each_attribute_once():
    import torch

    from benchmarks.probes.headroom import attribute_embedding
    from pva.demo.generator import ATTRIBUTES, sample_person

    a, b = (sample_person(0, i).names() for i in (0, 1))
    ea, eb = attribute_embedding(a, 64), attribute_embedding(b, 64)
    assert ea.shape == (64,) and int((ea > 0).sum()) == len(ATTRIBUTES)
    assert not torch.equal(ea, eb) and not ea[48:].any()
    with pytest.raises(ValueError, match="needs 48 values"):
        attribute_embedding(a, 32)


def test_bench_data_times_both_layouts(tmp_path):
    root = tmp_path / "faces"  # the bench's layout: <root>/<source>/<person>/
    people = root / "src"
    people.mkdir(parents=True)
    for name in ("deepface/id02_img3", "photomaker/yangmi_woman"):
        (people / name.split("/")[1]).symlink_to(REPO.parent / "shared/data/faces" / name)
    bench = _bench(
        "data",
        "--photos",
        str(root),
        "--image-size",
        "128",
        "--refs",
        "2",
        "--samples",
        "4",
        "--build-workers",
        "1",
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "ratio (ours / naive)" in bench.stdout and "workers one GPU needs" in bench.stdout


def test_seam_benchmark_on_the_quick_demo(quick_demo):
    from benchmarks.seam import bench_seam

    out, _ = quick_demo
    res = bench_seam(str(out), persons=2, steps=2)
    table = res["table"]
    assert set(table) == {"paste", "colour", "blend"} and res["fills"] == 8  # 2 persons x 4 masks
    for way in table.values():
        assert way["all/outside"] == 0.0  # no pixel outside the mask is ever touched
    assert table["blend"]["all/ring"] < table["paste"]["all/ring"]
    missing = _bench("seam", "--run", str(out / "models"))
    assert missing.returncode == 2 and "is missing" in missing.stderr
