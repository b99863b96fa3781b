"""Limits shared by every reader of untrusted input (README, "Security and limits")."""

#: Images with more pixels than this are refused: Pillow's decompression-bomb warning threshold (2^30 / 4 / 3).
DEFAULT_MAX_PIXELS = 89_478_485
