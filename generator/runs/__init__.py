"""Run folders: their files, training into one, loading, evaluation, recommendation, adding items, the demo."""
