"""``pva demo``: the paper in miniature on a CPU (generator, stage-0 stand-ins, orchestration)."""
