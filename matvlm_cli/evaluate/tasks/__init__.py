"""lm-eval task configs (YAML) and their hooks (utils.py), found by `TaskManager(include_path=<this folder>)`."""
