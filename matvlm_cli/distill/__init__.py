"""The `distill` subcommand's engine: teacher -> hybrid distillation, in one stage or several (docs/distill.md).

`trainer.py` is the recipe (setup steps, then the step loop); the modules beside it each do one job:
data (records, prepare, data, shapes, loaders), models (shared, models, stages), the losses (losses,
objective), checkpoints (checkpoint), the output folder (output) and what a run reports (report, throughput).
"""
