"""attnzoo: efficient attention blocks on shared Triton kernels, timm backbones, Lightning training.

Importing the package is cheap: no Triton compilation, no data loading. Kernels are imported on
first use (``attnzoo.kernels``); zoo models register with timm when ``attnzoo.zoo`` is imported.
"""

__version__ = "0.1.0"
