"""Linear probes on codes: protocol, rows, estimators, the C grid, SGD, fit, selection, solvers, pickle-free files, predict, the scikit-learn transformer, transferability scores."""
