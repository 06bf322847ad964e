"""Framework adapters (HuggingFace Trainer, Accelerate, DeepSpeed), importable as `logix.integrations`.

Each adapter imports its framework lazily, so the core works without any of them installed.
"""
