"""What a run prints: each line true and the user's to act on. Library lines that do not apply here are
filtered, each where it does not apply and only there; the model summary leaves out Lightning's FLOPs
figure (counted only through a model's `example_input_array`, which ours has none of: it printed 0)."""

import logging
import os
import warnings

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class _Dropping(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_LITLOGGER_TIP = _Dropping("💡 Tip: For seamless cloud")  # Lightning's advertisement for its cloud loggers


def quiet_libraries(resuming: bool = False) -> None:
    """Filters, for this process, the library lines that do not apply here:
    - Lightning's "`srun` is available but is not used" outside a SLURM allocation (no SLURM_JOB_ID): it
      fires wherever slurm-client is installed; inside an allocation it may mean a forgotten srun, so it stays;
    - Lightning's tips for litlogger and litmodels (advertisements, not about this run);
    - torch's deprecation of `LeafSpec` as Lightning's `_pytree` calls it (Lightning's to change, not the user's);
    - `resuming` a run in its own directory: that its checkpoint directory is not empty (it is the run's), and
      that the CSV logger will delete earlier logs (`tracking.logger_resume` kept them as metrics.<n>.csv).
    """
    if resuming:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    if not os.environ.get("SLURM_JOB_ID"):
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _LITLOGGER_TIP not in rank_zero.filters:
        rank_zero.addFilter(_LITLOGGER_TIP)


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary (layers, parameters, modes) without the FLOPs column and total."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict, total_flops: int, **summarize_kwargs) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:  # the first is the layer index, named " "
            table.add_column(name, style="dim" if name == " " else None,
                             justify="right" if name in ("Params", "Params per Device", "In sizes", "Out sizes") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*map(str, row))
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (("Trainable params", get_human_readable_count(int(trainable_parameters))),
                             ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
                             ("Total params", get_human_readable_count(int(total_parameters))),
                             ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                             ("Modules in train mode", total_training_modes["train"]),
                             ("Modules in eval mode", total_training_modes["eval"])):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
