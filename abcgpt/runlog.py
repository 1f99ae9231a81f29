"""A run's log: one line per event on the console, and the same as strict JSON lines in the run's log file."""
import json

from .atomic import strict


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RunLog:
    """Writes where the master process says; the other processes of a DDP run stay quiet."""

    def __init__(self, path, print_line=print, active=True):
        self.path, self.print_line, self.active = path, print_line, active

    def line(self, text: str) -> None:
        """A line on the console only."""
        if self.active:
            self.print_line(text)

    def record(self, record: dict, line: str = None) -> None:
        """One line (line, or the record) on the console, and the record appended to the log file."""
        if not self.active:
            return
        self.print_line(line or " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in record.items()))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(strict(record), allow_nan=False) + "\n")
