"""Benchmarks that reproduce docs/PERFORMANCE.md, each run from the repository root as
`python -m bench.NAME` (see each module's docstring). They measure through the product's own code
(`trainer.train.train_step`, `xc-train` and its `train_summary.json`, `xc-prep`); the product never
imports them. Lab harnesses live in dev/experiments/."""
