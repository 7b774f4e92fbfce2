"""Qt widgets: thin views over the compute core."""

from ._triton import refuse_triton

# Before any widget can import torch: see _triton for why.
refuse_triton()
