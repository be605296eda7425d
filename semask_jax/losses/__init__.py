"""Training losses: the FPN's pixel cross-entropy and OHEM (with its Pallas kernels), the
Mask2Former family's set criterion with its exact in-graph Hungarian matching, and
MaskFormer's (maskformer.py: full-pixel matching costs, full-resolution focal and dice)."""
