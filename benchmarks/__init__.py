"""Benchmarks and research probes: scripts that print measured figures, ratios side by side.

Not part of the installed ``pva`` package: run them from a clone with
``python -m benchmarks <name> [flags]`` (``python -m benchmarks --help`` lists them). Their
command line is generated from each function's signature and docstring by :mod:`pva.cli`.
"""

from __future__ import annotations

from pva.cli import Command

BENCHMARKS: tuple[Command, ...] = (
    Command("attention", "benchmarks.attention:bench_attention", "benchmarks.attention:RANGES"),
    Command("data", "benchmarks.data:bench_data", "benchmarks.data:RANGES"),
    Command("step", "benchmarks.step:bench_step", "benchmarks.step:RANGES"),
    Command("sample", "benchmarks.sample:bench_sample", "benchmarks.sample:RANGES"),
    Command("memory", "benchmarks.memory:bench_memory", "benchmarks.memory:RANGES"),
    Command("gpu", "benchmarks.gpu:gpu_check", "benchmarks.gpu:RANGES"),
    Command("seam", "benchmarks.seam:bench_seam", "benchmarks.seam:RANGES"),
    Command(
        "text-use", "benchmarks.probes.textuse:bench_text_use", "benchmarks.probes.textuse:RANGES"
    ),
    Command(
        "headroom",
        "benchmarks.probes.headroom:bench_headroom",
        "benchmarks.probes.headroom:RANGES",
        flags={"eval_dir": "--eval"},
    ),
)
"""Every benchmark and probe of ``python -m benchmarks``."""
