"""Planning and executing offload: which block lives in which tier, and the schedule loop."""
