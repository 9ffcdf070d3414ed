"""`python -m job` and the `finetune-job` console script. The signal handlers are installed on import of this module,
before the settings, torch or transformers are imported (job/signals.py): a signal at any moment of start-up is ours."""

from job import signals

signals.install()


def main() -> int:
    from job.cli import main as cli_main

    code = cli_main()
    signals.STOPPER.finish(code)  # the outcome is decided: a signal while the interpreter shuts down cannot change it
    return code


if __name__ == "__main__":
    import sys

    sys.exit(main())
