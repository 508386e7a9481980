"""Research probes: one-off measurements of the demo's stand-in models (not the method)."""
