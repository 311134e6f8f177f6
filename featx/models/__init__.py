"""Networks: the model spec, weights, building, preprocessing, taps and the resolved plan."""
