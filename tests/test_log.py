"""The job's log: one format for the job's events and the libraries' records."""

from __future__ import annotations

import json
import logging

from job import log


def test_a_library_warning_repeated_on_every_call_is_logged_once(capsys):
    """bitsandbytes' MatMul8bitLt warned on every int8 matmul: 336 of a two-step run's 363 log lines."""
    log.setup("json", "info")
    lib = logging.getLogger("bitsandbytes.autograd._functions")
    for _ in range(5):
        lib.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
    for attempt in (1, 2):  # another text each time (a retry's count): each is news
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry %d/5].", attempt)
    for _ in range(2):  # the job's own events are never filtered
        log.get().warning("disk almost full", free_gib=1)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    texts = [e["event"] for e in events]
    assert texts.count("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization") == 1
    assert [t for t in texts if t.startswith("Retrying")] == ["Retrying in 1s [Retry 1/5].", "Retrying in 1s [Retry 2/5]."]
    assert texts.count("disk almost full") == 2


def test_library_records_are_not_also_printed_raw_on_stderr(capsys):
    """datasets and huggingface_hub add a stderr handler to their root logger when first imported: a retry warning or
    datasets' "Failed to load JSON" came twice, raw on stderr and as the job's event."""
    log.setup("json", "info")
    log.route_library_logs(console=False)
    logging.getLogger("datasets.packaged_modules.json.json").error("Failed to load JSON from file %s", "x.jsonl")
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in %ds [Retry %d/5].", 1, 3)
    out, err = capsys.readouterr()
    assert "Failed to load JSON from file x.jsonl" in out and "Retrying in 1s [Retry 3/5]." in out
    assert "Failed to load JSON" not in err and "Retrying" not in err, err
