"""Parameter-space merging (FuseChat's last step): mergekit-style YAML, streaming bounded-memory engine.

    from polyfuse.merge import run_merge
    run_merge("merge.yaml", "runs/merged", seed=0)

Methods (:mod:`polyfuse.merge.methods`): linear, task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, model_stock, passthrough
(also with ``slices``: layer stacking), sce (``sce_variant: fusechat | mergekit``) and varm. The engine (:mod:`polyfuse.merge.engine`) reads
safetensors shards memory-mapped in row chunks and writes sharded safetensors, config, tokenizer and
a model card; it never loads a whole model.
"""

from polyfuse.merge.config import MergeConfig, load_merge_config, parse_merge_config
from polyfuse.merge.engine import MergePlan, MergeResult, execute_plan, parse_size, plan_merge, run_merge
from polyfuse.merge.methods import METHODS, get_method, merge_tensors

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergePlan",
    "MergeResult",
    "execute_plan",
    "get_method",
    "load_merge_config",
    "merge_tensors",
    "parse_merge_config",
    "parse_size",
    "plan_merge",
    "run_merge",
]
