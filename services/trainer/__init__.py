"""Self-supervised trainer: MoCo-v3 on target + selected web images, checkpoints, encoder versions."""
