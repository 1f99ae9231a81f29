"""A run's log: one line per event on the console, and the same as strict JSON lines in the run's log file."""
import json

from abcgpt.core.atomic import strict
from abcgpt.core.outputs import discard_stdout


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RunLog:
    """Writes where the master process says; the other processes of a DDP run stay quiet. A console that goes
    away (train.py | head) calls on_closed once, and the log file goes on."""

    def __init__(self, path, print_line=print, active=True, on_closed=None):
        self.path, self.print_line, self.active, self.on_closed = path, print_line, active, on_closed

    def line(self, text: str) -> None:
        """A line on the console only."""
        if self.active:
            self._say(text)

    def record(self, record: dict, line: str = None) -> None:
        """The record appended to the log file, and one line (line, or the record) on the console."""
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(strict(record), allow_nan=False) + "\n")
        self._say(line or " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in record.items()))

    def _say(self, text):
        try:
            self.print_line(text)
        except BrokenPipeError:
            discard_stdout()  # later lines go nowhere, quietly
            self.print_line = lambda text: None
            if self.on_closed is not None:
                self.on_closed()
