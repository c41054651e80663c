"""Title targets (GENRE) and generate-then-ground baselines (BIGRec) on the causal backbone; see docs/architecture.md."""
