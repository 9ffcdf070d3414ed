"""The model card's loading snippet, for each kind of base model and destination."""

from __future__ import annotations

from job.config import Settings
from job.publish import usage


def test_a_hub_destination_loads_from_the_repository_at_its_branch():
    snippet = usage(Settings(base_model="hf://acme/base", output_uri="hf://acme/out", hub_revision="v2"), "r1")
    assert 'AutoPeftModelForCausalLM.from_pretrained("acme/out", revision=\'v2\')  # and the base model, acme/base' \
        in snippet
    assert 'AutoTokenizer.from_pretrained("acme/out", revision=\'v2\')' in snippet


def test_a_folder_destination_loads_from_a_copy_of_the_run():
    snippet = usage(Settings(base_model="acme/base", output_uri="s3://bucket/runs/"), "r1")
    assert snippet.startswith("In a copy of this run's folder (`s3://bucket/runs/r1`)")
    assert 'from_pretrained("adapter")' in snippet and 'from_pretrained("tokenizer")' in snippet


def test_a_base_model_from_s3_is_loaded_by_the_user_then_the_adapter_onto_it():
    snippet = usage(Settings(base_model="s3://models/llama/", output_uri="/runs"), "r1")
    assert 'AutoModelForCausalLM.from_pretrained("<a local copy of s3://models/llama/>")' in snippet
    assert 'PeftModel.from_pretrained(base, "adapter")' in snippet and "AutoPeftModel" not in snippet


def test_a_local_base_model_is_loaded_from_its_path_then_the_adapter_onto_it(tmp_path):
    """adapter_config.json records the path the job read the model from: AutoPeftModelForCausalLM run anywhere else
    (or from another directory, for a relative path) looked it up on the Hub and failed."""
    (tmp_path / "base").mkdir()
    snippet = usage(Settings(base_model=str(tmp_path / "base"), output_uri="/runs"), "r1")
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "base"}")  # the path the job read it from' in snippet
    assert 'PeftModel.from_pretrained(base, "adapter")' in snippet and "AutoPeftModel" not in snippet
