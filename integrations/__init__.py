"""Framework adapters (HuggingFace Trainer, Accelerate, DeepSpeed), importable as `logix.integrations`.

Each adapter imports its framework lazily, so the core works without any of them installed.
Importing an adapter whose framework is missing raises logix.errors.MissingExtraError (an
ImportError) naming the package and the logix-tda extra to install (see logix/extras.py).
"""
