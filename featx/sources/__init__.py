"""Where images come from: folders, manifests, idx files, built-in sets; cutting them into splits; decoding."""
