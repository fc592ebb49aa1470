"""Framework adapters (Lightning, Hugging Face transformers, Accelerate), installed as ``curvwatch.integrations``."""
