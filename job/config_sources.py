"""Where settings come from besides the FT_* environment: the YAML file named by FT_CONFIG_FILE and a SageMaker
training job's hyperparameters, and the names they go by. job.config builds the Settings from these; a key none of
them knows is reported with a hint (a did-you-mean, upper case, or the library variable it should be)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from job import platforms
from job.errors import ConfigError, first_line

PREFIX = "FT_"
CONFIG_FILE_VAR = "FT_CONFIG_FILE"
# Variables of the libraries underneath (huggingface_hub, boto3; and AWS_* as a whole), which stay theirs: an
# FT_-prefixed or YAML copy of one is refused with a pointer to the real name rather than a did-you-mean.
STANDARD_VARIABLES = ("HF_TOKEN", "HF_HOME", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_DATASETS_CACHE")


class YamlSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by FT_CONFIG_FILE; keys as `lora_r` or `FT_LORA_R`."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        self.data = read_yaml(os.environ.get(CONFIG_FILE_VAR))

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k in self.settings_cls.model_fields}


class PlatformSource(PydanticBaseSettingsSource):
    """Below the YAML file: a SageMaker training job's hyperparameters, over what its container contract implies
    (job.platforms); nothing elsewhere."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        hyper = {field_name(k): v for k, v in hyperparameters().items()}
        self.data = {**platforms.sagemaker_defaults(os.environ), **hyper}

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k in self.settings_cls.model_fields}


def hyperparameters() -> dict[str, Any]:
    try:
        return platforms.hyperparameters(os.environ)
    except ValueError as e:
        raise ConfigError([f"SageMaker hyperparameters: {e}"]) from None


def read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError([f"{CONFIG_FILE_VAR}={path}: file not found"]) from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"{CONFIG_FILE_VAR}={path}: not readable YAML ({first_line(e)})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{CONFIG_FILE_VAR}={path}: must hold a mapping of settings, got {type(data).__name__}"])
    return {field_name(str(k)): v for k, v in data.items()}


def field_name(key: str) -> str:
    key = key.strip()
    return key[len(PREFIX):].lower() if key.upper().startswith(PREFIX) else key.lower()


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def unknown_settings(keys: list[str], where: str, fields) -> list[str]:
    """One problem per key of `keys` that is not the FT_* name of one of `fields` (nor FT_CONFIG_FILE), `where`
    saying where it was found, each with a hint."""
    known = [env_name(f) for f in fields] + [CONFIG_FILE_VAR]
    problems = []
    for key in keys:
        # Names are upper-case, as documented; pydantic-settings would read ft_lora_r as FT_LORA_R, but code that reads
        # a variable before the settings exist (FT_TERMINATION_LOG, the FT_RUN_ID given to workers) would not.
        if key in known:
            continue
        own = key.upper().removeprefix(PREFIX)
        if key.upper() in known:
            hint = f"; setting names are upper-case: {key.upper()}"
        elif own in STANDARD_VARIABLES or own.startswith("AWS_"):
            hint = f"; {own} is not an FT_* setting: set {own} itself in the environment, where its library reads it"
        elif close := difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.6):
            hint = f"; did you mean {close[0]}?"
        else:
            hint = f"; `finetune-job env` lists the {len(known)} known ones"
        problems.append(f"{key}: unknown setting{where}{hint}")
    return problems


# The credentials the libraries read from the environment, which the plain manifests' example Secret
# (k8s/secret.example.yaml) and the cloud definitions (deploy/) fill with this placeholder.
CREDENTIALS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
PLACEHOLDER = "REPLACE_ME"


def check_credentials(environ=None) -> None:
    """Raise ConfigError naming each credential still set to the examples' placeholder: boto3 would try a key
    `REPLACE_ME` before the pod's IRSA or workload identity, and the Hub would refuse the token, each after the run
    started."""
    environ = os.environ if environ is None else environ
    left = [name for name in CREDENTIALS if environ.get(name, "").startswith(PLACEHOLDER)]
    if left:
        raise ConfigError([f"{name}: still the examples' placeholder value; put the real value in the Secret, "
                           "or remove the key (without it the library's own chain applies: an IRSA or workload "
                           "identity role, an instance profile, a public model)" for name in left])
