"""lmforge: from raw English text to a small GPT-style question-answering model you can look inside.

Notebook / script entry point::

    import lmforge
    model, tokenizer = lmforge.load("runs/quickstart-...", checkpoint="best")
    logits = model(torch.tensor([tokenizer.encode("Hello")]))  # (batch, time, vocab)
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(run_dir, checkpoint: str = "best", device: str = "cpu"):
    """(model, tokenizer) of a run directory; see lmforge.pipeline.load."""
    from lmforge.pipeline import load as _load

    return _load(run_dir, checkpoint, device)


__all__ = ["load", "__version__"]
