"""Benchmark evaluation for matvlm on the lm-eval harness: scoring rules (`metrics`) for POPE, MMMU (val) and
TextVQA (val), their lm-eval tasks (`tasks/`), local data (`data`), the lm-eval model (`model`) and the
`evaluate` subcommand's engine (`run`, `report`)."""
