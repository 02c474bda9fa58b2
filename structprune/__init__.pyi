"""Type stub of the package's public API, and the list of it: ``__init__.py`` reads these imports
with :func:`lazy_loader.attach_stub`, so each name is imported from its module on first use and
``import structprune`` loads no torch. A public name is added here, and only here.

Each name is imported as itself (``name as name``): the form a stub uses to re-export."""
from .channels import (
    ChannelReport as ChannelReport,
    GroupProposal as GroupProposal,
    InteractivePruning as InteractivePruning,
    iter_groups as iter_groups,
    prune_channels as prune_channels,
)
from .depth import (
    DepthReport as DepthReport,
    block_influence as block_influence,
    remove_blocks as remove_blocks,
    residual_blocks as residual_blocks,
)
from .errors import (
    ExampleInputError as ExampleInputError,
    InvalidModelError as InvalidModelError,
    InvalidOptionError as InvalidOptionError,
    InvalidRatioError as InvalidRatioError,
    LoadError as LoadError,
    StructPruneError as StructPruneError,
    TraceError as TraceError,
    VerificationError as VerificationError,
)
from .graph.dependency_graph import (
    DependencyGraph as DependencyGraph,
    Group as Group,
)
from .layerwise.pretrained import (
    PretrainedReport as PretrainedReport,
    prune_pretrained as prune_pretrained,
)
from .masks import (
    Granularity as Granularity,
    Mask as Mask,
    SparsityReport as SparsityReport,
    apply_masks as apply_masks,
    list_granularities as list_granularities,
    register_granularity as register_granularity,
    remove_masks as remove_masks,
    sparsify as sparsify,
    sparsity_report as sparsity_report,
    to_semi_structured as to_semi_structured,
)
from .ops import (
    OpSpec as OpSpec,
    RuleContext as RuleContext,
    list_ops as list_ops,
    rule as rule,
    updater as updater,
)
from .ops.size_names import (
    register_size_attribute as register_size_attribute,
)
from .options import (
    Options as Options,
    PlanOptions as PlanOptions,
    PruneOptions as PruneOptions,
    ScoreOptions as ScoreOptions,
    TraceOptions as TraceOptions,
)
from .piecewise import (
    PiecewiseReport as PiecewiseReport,
    slim_submodules as slim_submodules,
)
from .pipeline import (
    PruningSession as PruningSession,
)
from .planning.planner import (
    Plan as Plan,
    Planner as Planner,
)
from .scoring import (
    Criterion as Criterion,
    ScoringContext as ScoringContext,
    get_criterion as get_criterion,
    list_criteria as list_criteria,
    register_criterion as register_criterion,
)
from .slim import (
    SlimReport as SlimReport,
    slim as slim,
    slim_whole_model as slim_whole_model,
    slim_with_report as slim_with_report,
)
from .tools.io import (
    load as load,
    save as save,
)
from .tools.metrics import (
    count_macs as count_macs,
    count_parameters as count_parameters,
    latency_ms as latency_ms,
)
from .tools.report import (
    Report as Report,
    report as report,
)
from .verify import (
    VerificationResult as VerificationResult,
)
from .workflows import (
    DistillResult as DistillResult,
    Iterative as Iterative,
    LotteryTicket as LotteryTicket,
    OneShot as OneShot,
    Pruner as Pruner,
    SoftPruner as SoftPruner,
    Step as Step,
    distill as distill,
    regularizer as regularizer,
)

__version__: str
__all__: list[str]
