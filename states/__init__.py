"""One module per step; each exposes `run(ctx)`, optional steps also `required(config, facts)`."""
