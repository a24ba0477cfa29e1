"""attnzoo: efficient attention blocks on shared Triton kernels, timm backbones, Lightning training.

``import attnzoo`` registers the zoo's ``attnzoo_*`` models with timm (``timm.create_model("attnzoo_vit_small")``)
and stays cheap: no Triton compilation, no data loading, no Lightning. Kernels compile on first use; the training
package (``attnzoo.train``) is imported only when used.
"""

import attnzoo.zoo  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
