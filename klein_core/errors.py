"""User-facing errors: each names the file or value at fault and says what to do about it."""


class KleinError(ValueError):
    """Base class for every error the pack reports to a user (CLI prints it without a traceback)."""


class PlanError(KleinError):
    """A planner input (image count, batch size, grad accumulation, repeats, steps) is out of range."""


class DatasetError(KleinError):
    """The dataset folder or one of its files cannot be used."""


class ModelError(KleinError):
    """A model file or folder is missing, corrupt, distilled, not Klein, or mismatched."""


class LoraFormatError(KleinError):
    """A LoRA file has keys we cannot map onto a Klein transformer."""


class ConfigError(KleinError):
    """A training setting (rank, learning rate, checkpoint interval, ...) is out of range."""


class ResumeError(KleinError):
    """A run folder cannot be resumed with the given dataset or config."""


class TrainingInterrupted(KleinError):
    """The user cancelled; the last completed training step was saved (the message says where)."""


class NonFiniteLoss(KleinError):
    """The loss went NaN/inf at ``training_step``; training stopped and the last good checkpoint was kept (``health``
    has the verdict)."""

    health: object = None  # the run's HealthSummary (collapse verdict, advice, best checkpoint) when known

    def __init__(self, training_step: int) -> None:
        super().__init__(f"the training loss became non-finite at training step {training_step}")
        self.training_step = training_step
