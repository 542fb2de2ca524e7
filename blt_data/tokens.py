"""Token ids of BLT's byte vocabulary (DESIGN.md §4), shared by the entropy scorer, the reader,
the models and generation.

Byte b has id b + 4; ids 0..3 are BOE/pad, BOS, EOS and one reserved id: 260 ids in all. This
is BLT's convention, so official checkpoints can be imported.
"""

PAD_ID = 0  # also BLT's BOE
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 4  # byte b has token id b + 4
VOCAB_SIZE = 256 + BYTE_OFFSET
IGNORE_INDEX = -100  # target where there is nothing to predict (torch's cross_entropy default)
