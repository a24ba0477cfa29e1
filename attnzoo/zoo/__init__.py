"""The zoo: backbones registered with timm (names start with ``attnzoo_``), pretrained cfgs, conversion.

Importing this package registers every family with timm; it builds no model and compiles no kernel.

Families (``FAMILIES``): ``vit`` (``attnzoo_vit_*``: plain ViT, attention chosen with ``attn=``), ``nat``
(``attnzoo_nat_*`` / ``attnzoo_dinat_*``: hierarchical neighborhood attention), ``halonet`` (``attnzoo_halonet*``:
timm's HaloNet on the fused halo kernel, loads timm ``halonet26t`` weights), ``davit_cfgs`` (``attnzoo_davit_*``:
window or neighborhood + channel self-attention; models in ``davit``), ``crossvit_cfgs`` (``attnzoo_crossvit_*``:
dual-branch with class-token cross attention; models in ``crossvit``), ``lm`` (``attnzoo_lm_<mixer>_*``: causal
token LMs with incremental decoding) and ``seqenc`` (``attnzoo_seqenc_*``: bidirectional time-series encoder).
The cfg modules carry the registrations so that timm files the models under our module names, not its own.
Shared pieces:
``_builder`` (cfg defaults, image-size errors), ``convert`` (checkpoint conversion, ``checkpoint_filter_fn``),
``listing`` (``model_rows``: the model table of the CLI and README; ``python -m attnzoo.zoo.listing --markdown``).
A model names its attention in ``attn_name`` for the listing.
"""

import importlib

# One module per family; each registers its ``attnzoo_*`` entrypoints with timm when imported.
FAMILIES: tuple[str, ...] = ("vit", "nat", "halonet", "davit_cfgs", "crossvit_cfgs", "lm", "seqenc")

for _family in FAMILIES:
    importlib.import_module(f"attnzoo.zoo.{_family}")
