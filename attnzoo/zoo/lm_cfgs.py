"""Sizes and pretrained cfgs of the ``attnzoo_lm_{mixer}_{size}`` causal language models (timm's ``default_cfgs``
table for ``attnzoo.zoo.lm``), and ``sequence_cfg``, the cfg base of the zoo's sequence models.

A sequence model takes no image, so its cfg has no image fields: ``input_size`` is None (timm then passes no
``in_chans`` / ``img_size`` to the model), and ``description`` / ``notes`` document the input instead.
"""

from __future__ import annotations

from typing import Any

from attnzoo.zoo.pretrained import default_cfgs_with_shipped

# size -> model arguments; max_len is the context length (learned positions).
LM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=6, num_heads=6, max_len=1024),
    "small": dict(embed_dim=384, depth=12, num_heads=6, max_len=2048),
}

# mixer -> (what it is, paper, paper id, reference code)
LM_MIXERS: dict[str, tuple[str, str, str, str]] = {
    "swa": ("causal sliding-window attention (1-D causal neighborhood attention, window 64)",
            "Longformer: The Long-Document Transformer", "arXiv:2004.05150", "https://github.com/allenai/longformer"),
    "linear": ("causal linear attention (elu+1 features, recurrent state)",
               "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", "arXiv:2006.16236",
               "https://github.com/idiap/fast-transformers"),
    "based": ("BASED: causal sliding-window softmax (window 64) + Taylor linear attention",
              "Simple linear attention language models balance the recall-throughput tradeoff", "arXiv:2402.18668",
              "https://github.com/HazyResearch/based"),
    "moh": ("causal softmax attention with mixture-of-heads routing",
            "MoH: Multi-Head Attention as Mixture-of-Head Attention", "arXiv:2410.11842",
            "https://github.com/SkyworkAI/MoH"),
    "softmax": ("causal softmax attention (GPT-style baseline)", "Attention Is All You Need", "arXiv:1706.03762",
                "https://github.com/karpathy/nanoGPT"),
}


def sequence_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg without image fields (Apache-2.0); ``kwargs`` add the description, notes and paper."""
    return {
        "url": "",
        "input_size": None,
        "num_classes": None,
        "mean": None,
        "std": None,
        "crop_pct": None,
        "interpolation": None,
        "license": "apache-2.0",
        **kwargs,
    }


def _cfg(mixer: str, size: str) -> dict[str, Any]:
    what, paper, paper_id, origin = LM_MIXERS[mixer]
    max_len = LM_SIZES[size]["max_len"]
    return sequence_cfg(
        description=f"causal language model, {what}",
        paper_name=paper,
        paper_ids=paper_id,
        origin_url=origin,
        notes=(
            f"input: token ids int64 (B, T), 1 <= T <= {max_len} (the context length, learned positions), ids in "
            "[0, vocab_size); vocab_size defaults to 256 (bytes / characters)",
            "output: next-token logits (B, T, vocab_size); the LM head is tied to the token embedding",
            "task: causal language modelling; decode with init_cache / forward_step, sample with generate",
        ),
    )


default_cfgs = default_cfgs_with_shipped({
    f"attnzoo_lm_{mixer}_{size}.untrained": _cfg(mixer, size) for mixer in LM_MIXERS for size in LM_SIZES
})
