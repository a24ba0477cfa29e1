"""Pretrained cfgs of the ``attnzoo_seqenc_*`` time-series encoders (timm's ``default_cfgs`` table for
``attnzoo.zoo.seqenc``); the input is documented in ``notes`` (a sequence cfg has no image size)."""

from __future__ import annotations

from typing import Any

from attnzoo.zoo.lm_cfgs import sequence_cfg
from attnzoo.zoo.pretrained import default_cfgs_with_shipped

# size -> model arguments; max_len is the longest series in steps (learned positions of max_len / patch_size patches).
SEQENC_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=128, depth=4, num_heads=4, patch_size=4, max_len=1024),
    "small": dict(embed_dim=256, depth=8, num_heads=8, patch_size=4, max_len=2048),
}


def _cfg(size: str) -> dict[str, Any]:
    args = SEQENC_SIZES[size]
    return sequence_cfg(
        classifier="head",
        description="bidirectional time-series encoder (patch embedding, selectable mixer) with a classification or "
                    "forecasting head",
        paper_name="A Time Series is Worth 64 Words: Long-term Forecasting with Transformers",
        paper_ids="arXiv:2211.14730",
        origin_url="https://github.com/yuqinie98/PatchTST",
        notes=(
            f"input: float series (B, T, in_chans), T a multiple of patch_size={args['patch_size']} and <= "
            f"max_len={args['max_len']} (learned positions); series are normalized by the data pipeline",
            "output: classification logits (B, num_classes), or with horizon > 0 a forecast (B, horizon, in_chans)",
            "mixer: softmax | na (1-D neighborhood, kernel 7) | linear (elu+1) | moh (mixture-of-heads)",
        ),
    )


default_cfgs = default_cfgs_with_shipped({f"attnzoo_seqenc_{size}.untrained": _cfg(size) for size in SEQENC_SIZES})
