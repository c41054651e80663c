"""The networks, no Lightning: the T5 generator, the causal generator, the title head, the dense head, checkpoints."""
