"""The crash-safe HDF5 store: journal, finalizing, verification, typed metadata, reading, the cache."""
