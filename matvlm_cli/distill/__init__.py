"""The `distill` subcommand's engine: teacher -> hybrid distillation, in one or more stages (MaTVLM's losses; docs/distill.md)."""
