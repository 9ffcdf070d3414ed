"""Logging: structlog JSON lines off a TTY, a readable console on one; secrets redacted everywhere.

Records from the libraries we drive (transformers, datasets, peft, huggingface_hub) go through the same renderer,
so a Kubernetes log is one JSON object per line from start to end.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog

# Variables of other tools whose values must never be printed or written. Read at redaction time, so a value
# set after start-up (a token refreshed by a sidecar) is still covered.
SECRET_VARS = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY", "WANDB_API_KEY",
)
# Well-known token shapes, caught even when they did not come from those variables.
TOKEN_PATTERNS = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# Credentials written into a URL (https://user:secret@host).
URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@")
REDACTED = "***"
_configured = False


def redact(text: str) -> str:
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, REDACTED)
    text = TOKEN_PATTERNS.sub(REDACTED, text)
    return URL_CREDENTIALS.sub(REDACTED + "@", text)


def redact_value(value: Any) -> Any:
    """Redact secrets in strings nested anywhere inside dicts and lists."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def _redact_processor(_logger, _name, event_dict: dict[str, Any]) -> dict[str, Any]:
    return redact_value(event_dict)


def use_console(log_format: str) -> bool:
    return log_format == "console" or (log_format == "auto" and sys.stdout.isatty())


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted, not the stream of the moment logging was set up
    (which a redirection or a test's capture may have closed since)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


LIBRARIES = ("transformers", "datasets", "peft", "trl", "huggingface_hub", "accelerate", "bitsandbytes")


class OncePerMessage(logging.Filter):
    """Passes a library's record only the first time its text is seen: some warn on every call (bitsandbytes'
    MatMul8bitLt logged "inputs will be cast ... to float16" 336 times in a two-step int8 run). Records that differ in
    their text (a retry's count) all pass; the job's own records are not filtered. Remembers up to `limit` texts."""

    def __init__(self, limit: int = 10_000):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] not in LIBRARIES:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        if len(self.seen) < self.limit:
            self.seen.add(key)
        return True


def setup(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog and route the standard library's logging through it."""
    global _configured
    _configured = True
    console = use_console(log_format)
    renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()) if console else structlog.processors.JSONRenderer()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
    )
    handler = _StdoutHandler()
    handler.setFormatter(formatter)
    handler.addFilter(OncePerMessage())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The libraries' own loggers stop propagating by default; send them to ours, quieter than our own level.
    for name in LIBRARIES:
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
        lib.setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    # On the CPU, bitsandbytes warns at import that an optional kernel package is missing; its fallback is fine.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def route_library_logs(console: bool) -> None:
    """Make transformers, datasets and huggingface_hub log through our handler (they install their own on first
    use), and keep their progress bars off unless a person is watching."""
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.utils.logging.enable_propagation()
    huggingface_hub.utils.logging.enable_propagation()
    # datasets and huggingface_hub give their root logger a stderr handler when first imported (after setup()
    # cleared them): their records came twice, raw on stderr and as our events.
    for name in LIBRARIES:
        logging.getLogger(name).handlers[:] = []
    for lib in (transformers.utils.logging, datasets.utils.logging):
        lib.set_verbosity(max(logging.WARNING, logging.getLogger().level))
    if not console:
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def is_configured() -> bool:
    return _configured


def get(name: str = "finetune-job") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
