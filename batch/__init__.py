"""The offline plane: vectorized recomputation of patient state and features from the archive
(features), labels and model training (train), and the model registry (registry)."""
