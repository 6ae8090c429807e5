"""The trainer side: imported inside the training process (torch is imported lazily here)."""
