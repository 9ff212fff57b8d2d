"""Benchmark evaluation for matvlm: pure scoring rules (`metrics`) for POPE, MMMU (val) and TextVQA (val)."""
