"""Image encoder (ResNet, DeepLab-v3+, projection heads) and the CLIP text tower."""
