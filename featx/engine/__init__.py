"""Running a network over images: the forward pass, autotune, the extract job, torchrun."""
