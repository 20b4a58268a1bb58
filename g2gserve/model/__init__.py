"""The network: config, masks, layers, G2GNet, accounting, checkpoint."""
