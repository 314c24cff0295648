"""Model building: render, augment, features, train, quantize, the command head, package, evaluate against peers."""
