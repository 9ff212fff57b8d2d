"""The `distill` subcommand's engine: single-stage teacher -> hybrid distillation (method.md §5)."""
