"""Benchmarks printed by ``pva bench ...`` (measured figures, ratios side by side)."""
