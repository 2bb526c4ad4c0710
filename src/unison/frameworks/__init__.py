"""Framework integrations (PyTorch, Keras), each imported only when used."""
