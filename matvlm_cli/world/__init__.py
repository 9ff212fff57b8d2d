"""The synthetic visual-QA world: procedural scenes with ground truth, benchmark-style questions about
them, LLaVA training conversations and POPE / MMMU / TextVQA parquet sets in the Hugging Face schemas.
Deterministic from a seed. `python -m matvlm_cli.world --output DIR` writes one."""

from .questions import caption, mmmu_prompt, pope_prompt, textvqa_prompt, world_corpus, world_vocabulary
from .scenes import Scene, SceneObject, render, sample_scene, world_statistics
from .writers import WorldPaths, generate_world, world_paths

__all__ = [
    "Scene", "SceneObject", "WorldPaths", "caption", "generate_world", "mmmu_prompt", "pope_prompt", "render",
    "sample_scene", "textvqa_prompt", "world_corpus", "world_paths", "world_statistics", "world_vocabulary",
]
