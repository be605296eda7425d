"""Training losses: the FPN's pixel cross-entropy and OHEM (with its Pallas kernels), and
the Mask2Former family's set criterion with its exact in-graph Hungarian matching."""
