"""Recipes: every subcommand's settings as one typed dataclass, read from YAML, flags and `--set`.

`loading` reads and validates (for all of them); one module per subcommand holds its recipe and checks;
`shipped` finds the recipes that ship with the package.
"""

from .bench import BenchRecipe, check_bench_recipe
from .convert import ConvertRecipe
from .distill import (
    STAGE_OPTIMIZER_KEYS,
    DataSource,
    DistillRecipe,
    DistillStage,
    LossWeights,
    OptimizerSettings,
    OutputSettings,
    StudentSpec,
    TrainingSettings,
    check_distill_recipe,
    stage_settings,
    teacher_layer_count,
)
from .evaluate import EvaluateRecipe
from .export import ExportRecipe
from .generate import GenerateRecipe
from .loading import (
    RecipeLoader,
    RecipeSource,
    build_recipe,
    load_recipe,
    parse_override,
    parse_yaml,
    problems_error,
    read_yaml,
    save_recipe,
    set_dotted,
    setting,
)
from .shipped import copy_recipe, resolve_recipe, shipped_recipe, shipped_recipes

__all__ = [
    "BenchRecipe", "ConvertRecipe", "DataSource", "DistillRecipe", "DistillStage", "EvaluateRecipe", "ExportRecipe",
    "GenerateRecipe", "LossWeights", "OptimizerSettings", "OutputSettings", "RecipeLoader", "RecipeSource",
    "STAGE_OPTIMIZER_KEYS", "StudentSpec", "TrainingSettings", "build_recipe", "check_bench_recipe",
    "check_distill_recipe", "copy_recipe", "load_recipe", "parse_override", "parse_yaml", "problems_error",
    "read_yaml", "resolve_recipe", "save_recipe", "set_dotted", "setting", "shipped_recipe", "shipped_recipes",
    "stage_settings", "teacher_layer_count",
]
