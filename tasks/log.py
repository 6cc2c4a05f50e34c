"""Errors and logging every stage shares: a PipelineError is the user's to fix and is shown as one line; every log
line is one line of data (control characters in file names and titles are shown escaped).

Infrastructure: no result depends on this module, so editing it recomputes nothing (tasks/hashing.py: INFRASTRUCTURE).
"""

from __future__ import annotations

import logging


class PipelineError(Exception):
    """A failure the user can fix (bad input, missing file): shown as one line, not a traceback."""


class _OneLinePipelineErrors(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for a PipelineError the message is the news."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True



def shown(text: object) -> str:
    """Text from the inputs (a file name, a title) as it may appear in a log line or an error: control characters
    (newlines, ANSI escapes) are shown escaped, so a crafted name cannot forge log lines or recolour a terminal."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _EscapeControlChars(logging.Filter):
    """Every pipeline log line is one line of data: file names and titles reach log messages verbatim."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = shown(message), None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs", "papertune"):
    logging.getLogger(_name).addFilter(_OneLinePipelineErrors())
    logging.getLogger(_name).addFilter(_EscapeControlChars())



def logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run; the `papertune` logger outside (a test, a notebook)."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow run
        return logging.getLogger("papertune")
