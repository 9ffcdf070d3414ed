"""What a batch service provides in place of settings: SageMaker's training-container contract, mapped to defaults.

A SageMaker training job (bring your own container) starts the image with the argument `train` (the CLI takes it
as `run`), sets TRAINING_JOB_NAME (the run id: managed spot restarts keep it), and gives the job files rather than
variables (https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-running-container.html):

- /opt/ml/input/config/hyperparameters.json: the job's HyperParameters, string values; keys are settings, written
  `lora_r` or `FT_LORA_R` (keys starting with `sagemaker_`, which SageMaker's SDK adds, are left alone);
- /opt/ml/input/config/inputdataconfig.json: the input channels, each copied to /opt/ml/input/data/<channel>;
  the channel `train` becomes FT_DATASET and the channel `model` FT_BASE_MODEL;
- /opt/ml/model: uploaded as model.tar.gz when the job ends: FT_OUTPUT_URI;
- /opt/ml/output/failure: the failure reason DescribeTrainingJob shows: FT_TERMINATION_LOG;
- StopTrainingJob (and a spot interruption) sends SIGTERM and kills the container 120 s later:
  FT_TERMINATION_GRACE_SECONDS=110.

The SageMaker Training Toolkit's variables (SM_MODEL_DIR, SM_CHANNEL_<NAME>, SM_INPUT_CONFIG_DIR), when an image or
a user sets them, name these places instead. Everything here is a default: FT_* variables, FT_CONFIG_FILE and the
hyperparameters override it (in that order). This module only reads the mapping it is given; job.config passes the
environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SAGEMAKER_JOB_VAR = "TRAINING_JOB_NAME"
SAGEMAKER_STOP_SECONDS = 120  # StopTrainingJob: SIGTERM, then SIGKILL after 120 s
SAGEMAKER_GRACE_SECONDS = 110  # leaves 10 s of SageMaker's 120 for the process to exit and the last file to land
OPT_ML = Path("/opt/ml")
CHANNEL_SETTINGS = {"train": "dataset", "model": "base_model"}
SDK_KEY_PREFIX = "sagemaker_"


def on_sagemaker(environ: Mapping[str, str]) -> bool:
    """True inside a SageMaker training job (TRAINING_JOB_NAME is set)."""
    return bool(environ.get(SAGEMAKER_JOB_VAR))


def config_dir(environ: Mapping[str, str]) -> Path:
    """SageMaker's folder of JSON files describing the job (SM_INPUT_CONFIG_DIR, else /opt/ml/input/config)."""
    return Path(environ.get("SM_INPUT_CONFIG_DIR") or OPT_ML / "input" / "config")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, {} when there is none. Raises ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def hyperparameters(environ: Mapping[str, str]) -> dict[str, Any]:
    """The training job's HyperParameters (key as written -> value), without the SageMaker SDK's own keys; {} outside
    SageMaker. Raises ValueError when the file is not a JSON object."""
    if not on_sagemaker(environ):
        return {}
    data = _read_json(config_dir(environ) / "hyperparameters.json")
    return {str(k): v for k, v in data.items() if not str(k).lower().startswith(SDK_KEY_PREFIX)}


def channels(environ: Mapping[str, str]) -> dict[str, str]:
    """Input channel name -> local directory SageMaker copied it to (SM_CHANNEL_<NAME> when set)."""
    names = set(_read_json(config_dir(environ) / "inputdataconfig.json"))
    names |= {k.removeprefix("SM_CHANNEL_").lower() for k in environ if k.startswith("SM_CHANNEL_")}
    return {name: environ.get(f"SM_CHANNEL_{name.upper()}") or str(OPT_ML / "input" / "data" / name)
            for name in sorted(names)}


def termination_log(environ: Mapping[str, str]) -> str | None:
    """Where SageMaker reads a failed job's reason; None outside SageMaker."""
    return str(OPT_ML / "output" / "failure") if on_sagemaker(environ) else None


def sagemaker_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings (field name -> value) that SageMaker's container contract implies; {} outside SageMaker."""
    if not on_sagemaker(environ):
        return {}
    defaults: dict[str, Any] = {
        "output_uri": environ.get("SM_MODEL_DIR") or str(OPT_ML / "model"),
        "termination_log": termination_log(environ),
        "termination_grace_seconds": SAGEMAKER_GRACE_SECONDS,
    }
    found = channels(environ)
    for channel, field in CHANNEL_SETTINGS.items():
        if channel in found:
            defaults[field] = found[channel]
    return defaults
