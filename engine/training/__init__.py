"""Training-time code (PyTorch, TTS, data synthesis). Never imported at run time."""
