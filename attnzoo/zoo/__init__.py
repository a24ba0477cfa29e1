"""The zoo: backbones registered with timm (names start with ``attnzoo_``), pretrained cfgs, conversion.

Importing this package registers every family with timm; it builds no model and compiles no kernel.
"""

import importlib

# One module per family; each registers its ``attnzoo_*`` entrypoints with timm when imported.
FAMILIES: tuple[str, ...] = ()

for _family in FAMILIES:
    importlib.import_module(f"attnzoo.zoo.{_family}")
