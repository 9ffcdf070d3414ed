"""`finetune-job [run|config|env|check]` (`train`, SageMaker's argument, is `run`): the container's entrypoint.

Every failure ends with a one-line reason (also written to the termination log) and an exit code from
job.errors.EXIT_CODES; only a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

from job import log, signals
from job.config import Settings, env_name, load_settings, requested_log_format
from job.config_sources import check_credentials
from job.errors import EXIT_CODES, ConfigError, InterruptedJob, JobError, StopSignal
from job.signals import termination_log_path, write_termination_log


def type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if args and len(args) < len(typing.get_args(annotation)):  # Optional[X]
        return type_name(args[0])
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}.get(annotation, str(annotation))


def env_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else str(field.default)
        rows.append((env_name(name), type_name(field.annotation), default, field.description or ""))
    return rows


def env_markdown() -> str:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {t} | {f'`{d}`' if d else ''} | {m} |" for n, t, d, m in env_rows()]
    return "\n".join(lines) + "\n"


def exit_codes_markdown() -> str:
    lines = ["| code | name | retriable | meaning |", "|---|---|---|---|"]
    lines += [f"| {e.code} | `{e.name}` | {'yes' if e.retriable else 'no'} | {e.meaning} |" for e in EXIT_CODES]
    return "\n".join(lines) + "\n"


def cmd_env(args) -> int:
    if args.exit_codes:
        print(exit_codes_markdown() if args.markdown else "\n".join(
            f"{e.code:>3}  {e.name:<14} {'retriable' if e.retriable else 'final':<10} {e.meaning}" for e in EXIT_CODES))
        return 0
    if args.markdown:
        print(env_markdown(), end="")
        return 0
    for name, typ, default, meaning in env_rows():
        plain = typ.replace(" \\| ", "|").replace("`", "")
        print(f"{name}  ({plain}, default: {default or 'unset'})\n    {meaning}")
    print("\nAlso honoured: HF_TOKEN, HF_HOME, HF_ENDPOINT (huggingface_hub); FT_CONFIG_FILE names a YAML file of "
          "settings that the environment overrides.")
    return 0


def cmd_config(args) -> int:
    cfg = load_settings()
    print(log.redact(json.dumps(cfg.model_dump(mode="json"), indent=2)))
    return 0


def _settings() -> Settings:
    """The settings of `run` and `check`, with what holds once they are valid: their FT_TERMINATION_LOG (from any
    source), and no credential left at the examples' placeholder before the destination is read with it."""
    cfg = load_settings()
    signals.use_termination_log(cfg.termination_log)
    check_credentials()
    return cfg


def cmd_check(args) -> int:
    from job import completion, preflight
    from job.identity import resolve_run_id, training_fingerprint
    from job.storage import StorageOptions, configure, open_destination

    cfg = _settings()
    if args.show is not None and (args.show < 0 or not args.data):
        raise ConfigError(["--show: a number of samples (0 or more) to show, with --data"])
    log.setup(cfg.log_format, cfg.log_level)
    log.route_library_logs(log.use_console(cfg.log_format))  # datasets' progress bars and warnings, as in `run`
    configure(StorageOptions.of(cfg))
    run_id = resolve_run_id(cfg)
    dest = open_destination(cfg.output_uri)
    if completion.find(dest.for_checks(), run_id, training_fingerprint(cfg), cfg.overwrite, cfg.export).intact:
        log.get().info("run already complete: `run` ends at once if the data is unchanged", uri=dest.describe(run_id))
    preflight.run(cfg, run_id)
    if args.data:
        preflight.check_data(cfg, 1 if args.show is None else args.show)
    return 0


def cmd_run(args) -> int:
    from job import distributed

    cfg = _settings()
    distributed.one_gpu_only(cfg)  # before any import that may start CUDA (transformers asks torch.cuda early)
    from job import pipeline

    log.setup(cfg.log_format, cfg.log_level)
    console = log.use_console(cfg.log_format)
    log.route_library_logs(console)
    if distributed.wants_launcher(cfg):  # several GPUs or nodes: this process becomes torchrun
        from job.identity import resolve_run_id

        return distributed.launch(cfg, resolve_run_id(cfg))
    stopper = signals.STOPPER
    stopper.configure(cfg.termination_grace_seconds, write_termination_log)
    summary = pipeline.run(cfg, console, stopper)
    if console and "adapter" in summary:
        print(f"\nadapter:     {summary['adapter']}\ntensorboard: tensorboard --logdir {summary['tensorboard']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune-job", description="QLoRA fine-tuning as a batch job, configured by FT_* "
                                "environment variables (see `finetune-job env`).")
    sub = p.add_subparsers(dest="command")
    # `train`: the argument a SageMaker training job starts the image with.
    sub.add_parser("run", aliases=["train"], help="fine-tune and publish (the default)").set_defaults(func=cmd_run)
    sub.add_parser("config", help="print the effective configuration, secrets redacted").set_defaults(func=cmd_config)
    env = sub.add_parser("env", help="list every variable with its type, default and meaning")
    env.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's)")
    env.add_argument("--exit-codes", action="store_true", help="list the exit codes instead")
    env.set_defaults(func=cmd_env)
    check = sub.add_parser("check", help="validate the configuration and the sources and destination")
    check.add_argument("--data", action="store_true", help="also download the dataset and the tokenizer (not the "
                       "weights), tokenize every record as a run would and count the optimizer steps")
    check.add_argument("--show", type=int, metavar="N", help="with --data: log the first N training "
                       "samples as the model sees them, the trained tokens in [[ ]] (default 1)")
    check.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    func = getattr(args, "func", cmd_run)
    if func in (cmd_run, cmd_check):
        log.setup(requested_log_format())  # a configuration error is logged before the settings exist
    signals.install()  # done already by job/__main__.py (the entrypoint); again for callers of main() alone
    try:
        return func(args)
    except StopSignal as e:  # torchrun's launcher, told by torch's own handler (job.distributed.launch)
        return _fail(InterruptedJob(str(e)))
    except BrokenPipeError:  # `finetune-job env | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except JobError as e:
        return _fail(e)
    except Exception as e:  # noqa: BLE001 - the one place that turns a bug into exit code 1
        from job import diskspace, distributed
        from job.errors import OutOfMemoryError

        if (full := diskspace.error_for(e)) is not None:  # ENOSPC from wherever it came (a library's own form)
            return _fail(full)
        if distributed.is_worker() and (failure := distributed.collective_failure(e)):
            # The echo of another process's failure: that one's reason stays in the termination log.
            return _fail(failure, keep_termination_log=True)
        if type(e).__name__ == "OutOfMemoryError":  # torch's, raised outside training
            return _fail(OutOfMemoryError(str(e).splitlines()[0]))
        log.get().exception("unexpected error", error=log.redact(str(e)))
        write_termination_log(log.redact(f"unexpected: {type(e).__name__}: {e}"))
        return 1


def _fail(e: JobError, keep_termination_log: bool = False) -> int:
    lines = getattr(e, "problems", None) or [e.reason]
    if not log.is_configured():
        for line in lines:
            print(f"finetune-job: {log.redact(line)}", file=sys.stderr)
    else:
        for line in lines:
            log.get().error(log.redact(line), exit_code=e.exit_code, reason=e.exit_name)
    path = termination_log_path()
    if not (keep_termination_log and path is not None and path.is_file() and path.stat().st_size):
        write_termination_log(log.redact(f"{e.exit_name}: {e.reason}"))
    return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
