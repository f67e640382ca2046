"""Plain nn.Module networks used by the Lightning modules."""
