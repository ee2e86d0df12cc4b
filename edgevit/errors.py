"""One error family for everything a user can get wrong; the CLI maps each to an exit code."""


class EdgeVitError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""

    exit_code = 1


class OutputError(EdgeVitError):
    """An output path edgevit will not write: a user's own file or folder there, or no write access."""

    exit_code = 1


class ConfigError(EdgeVitError):
    """A recipe, target or sparsity config that does not validate."""

    exit_code = 2


class DataError(EdgeVitError):
    """A data set that is missing, malformed or of the wrong layout."""

    exit_code = 3


class CheckpointError(EdgeVitError):
    """A checkpoint that is missing, corrupt, truncated or does not match the model."""

    exit_code = 4


class DeviceError(EdgeVitError):
    """An unreachable tracker, an unknown key, or a device that fails to run an artifact."""

    exit_code = 5


class ValidationError(EdgeVitError):
    """A compiled model whose output disagrees with PyTorch's."""

    exit_code = 6


class InfeasibleBudget(EdgeVitError):
    """A latency budget no sparsity config of the model meets on the target."""

    exit_code = 7


class LatencyRegression(EdgeVitError):
    """`bench --baseline/--against`: the head artifact is slower, by more than the factor and significantly."""

    exit_code = 10


class AccuracyRegression(EdgeVitError):
    """`bench --baseline/--against --data`: the head artifact lost more top-1 than allowed."""

    exit_code = 11


class BudgetMiss(EdgeVitError):
    """`bench --budget`: the latency statistic is over the budget (or too few samples to claim it)."""

    exit_code = 12
