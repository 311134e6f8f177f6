"""The bench: configuration, grid, scores, run, fine-tune cells, analysis, the cross-model choice, the report."""
