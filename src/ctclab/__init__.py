"""ctclab: a reproducibility harness for CTC phoneme-recognition experiments."""
