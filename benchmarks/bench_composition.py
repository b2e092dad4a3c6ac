"""Where composition is lost: the ceilings of a demo run's dVAE and CLIP on the evaluation suite.

    python benchmarks/bench_composition.py --run runs/demo [--images 16]

For every prompt of the suite (demo/suite.py), `--images` scenes are drawn as the prompt asks,
at the dVAE's resolution, and

  - judged as drawn (the detector's own error: 0 when it reads clean scenes right),
  - judged after a round trip through the run's dVAE (encode to codes, decode): what the best
    possible transformer could reach with this code grid, per level and task,
  - set against a near miss by the run's CLIP (both round-tripped, as the reranker sees
    samples): the relation turned over, the colours of two objects swapped, one copy too many,
    or the other colour for one object. "clip_prefers_right" is the share of pairs where the CLIP
    scores the right scene higher: 0.5 is a reranker that cannot tell them apart.
    "reranker_prefers_right_relation" is the same for relation prompts as reranking sorts them
    (dalle.sample.rerank.rerank_key: with gallery.relation_weight, CLIP's score plus the relation margin),
    "reranker_prefers_right_binding" for two-object prompts against their colour-swapped twin (with
    gallery.binding_weight, CLIP's score plus the binding margin).

With the run's eval.json (its model's scores, and "oracle_after", what a perfect reranker would
have kept from the same samples), this says whether the grid, the sampler or the reranker loses a
task. A run with a CLIP and no dVAE yet (`dalle curate`, or `bench_demo_models.py --retrain clip`
on one) has its CLIP judged on clean scenes at the world's image size, to compare CLIP recipes
without training the rest. "clip_on_training_relations" asks the same of the CLIP on relation
pairs it trained on: their image against the image mirrored (the relation turned over), and their
caption against the mirrored caption: a CLIP at 0.5 there has not learnt relations at all, which
no sampler can make up for. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time

import numpy as np
import torch

from dalle.curate.fates import passing_pairs
from dalle.models.weights import load_dvae
from dalle.runroot import DVAE, EVAL_REPORT, latest_pointer, run_config
from dalle.sample.evaluation import scorecard_figures
from dalle.sample.rerank import decode_codes, rerank_key
from dalle.sample.sampler import run_clip
from dalle.storage import Storage, StorageError
from dalle.train.clip import MIRROR_AXES, mirror
from demo.negatives import mirrored_caption
from demo.suite import SuitePrompt, score_images, suite_prompts
from demo.world import INVERSE_RELATIONS, WorldConfig, compose, render, seeded_rng, world_config


def scene(prompt: SuitePrompt, seed: int, side: int, miss: bool = False):
    """A clean image of what the prompt asks for, or (miss) of its nearest mistake."""
    combos = [(c, s) for c, s, _ in prompt.objects]
    count, relation, kind = prompt.objects[0][2], prompt.relation, prompt.kind
    if miss:
        if kind == "relation":
            relation = INVERSE_RELATIONS[relation]
        elif kind == "two":
            combos = [(combos[1][0], combos[0][1]), (combos[0][0], combos[1][1])]
        elif kind == "count":
            count += 1 if count < 4 else -1
        else:
            other = "blue" if combos[0][0] != "blue" else "red"
            combos = [(other, combos[0][1])]
    if kind in ("single", "count"):
        kind = "count" if count > 1 else "single"
    return render(compose(seeded_rng(seed, 17), kind, combos, side, relation=relation, count=count), side)


def round_trip(dvae, images) -> list:
    pixels = torch.tensor(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(
        0, 3, 1, 2
    )
    device = next(dvae.parameters()).device
    return decode_codes(dvae, dvae.encode(pixels.to(device)))


def training_relations(storage: Storage, clip, pairs: int = 200) -> dict:
    """How often the CLIP prefers, on relation pairs it trained on (up to `pairs`, at random), their
    image to the mirrored one (image side) and their caption to the mirrored caption (text side)."""
    from PIL import Image

    try:
        images, captions = passing_pairs(storage)
    except StorageError as err:  # a copy of a run without its raw shards
        return {"pairs": 0, "skipped": str(err)}
    found = []
    for index, caption in enumerate(captions):
        for axis in MIRROR_AXES:
            turned = mirrored_caption(str(caption), axis)
            if turned:
                found.append((index, axis, turned))
    chosen = random.Random(0).sample(found, min(pairs, len(found)))
    if not chosen:
        return {"pairs": 0}
    shown = [Image.open(io.BytesIO(images[i])).convert("RGB") for i, _, _ in chosen]
    mirrored = [mirror(image, axis) for image, (_, axis, _) in zip(shown, chosen)]
    own = [str(captions[i]) for i, _, _ in chosen]
    right = clip.score(shown, own)
    return {
        "pairs": len(chosen),
        "image_side": round(float(np.mean(right > clip.score(mirrored, own))), 3),
        "text_side": round(float(np.mean(right > clip.score(shown, [t for _, _, t in chosen]))), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="root of a demo run with a trained dVAE (and CLIP)")
    parser.add_argument("--images", type=int, default=16, help="scenes drawn per prompt (default 16)")
    args = parser.parse_args()

    storage = Storage(args.run)
    cfg = run_config(storage)
    world: WorldConfig = world_config(cfg)
    clip = run_clip(storage, cfg)
    dvae = None
    if storage.exists(latest_pointer(DVAE)):
        dvae, identity = load_dvae(storage)
        dvae.eval()
    elif clip is None:
        raise SystemExit(
            f"{storage.uri()} has neither a dVAE nor a CLIP: run `dalle curate` or `dalle demo` first"
        )
    side = dvae.cfg.image_size if dvae is not None else world.image_size
    # What the reranker sees: the dVAE's reconstructions, or the clean scenes where there is no dVAE.
    seen_by_clip = (lambda images: round_trip(dvae, images)) if dvae is not None else (lambda images: images)
    prompts = suite_prompts(world)
    vocabulary = {"colors": world.colors, "shapes": world.shapes}
    start = time.perf_counter()

    drawn = {p.prompt: [scene(p, seed, side) for seed in range(args.images)] for p in prompts}
    missed = {p.prompt: [scene(p, seed, side, miss=True) for seed in range(args.images)] for p in prompts}
    decoded = {text: seen_by_clip(images) for text, images in drawn.items()}
    report: dict = {
        "run": storage.uri(),
        "dvae": {"step": identity["step"], "image_size": side, "grid": dvae.grid}
        if dvae is not None
        else None,
        "images_per_prompt": args.images,
        "detector_on_clean_scenes": scorecard_figures(score_images(prompts, drawn, **vocabulary)),
    }
    if dvae is not None:
        report["dvae_ceiling"] = scorecard_figures(score_images(prompts, decoded, **vocabulary))
    # The figures are the same before and after (nothing is reranked): keep one.
    for key in [key for key in ("detector_on_clean_scenes", "dvae_ceiling") if key in report]:
        report[key] = {
            level: {task: cell["before"] for task, cell in cells.items()}
            for level, cells in report[key].items()
        }

    if clip is not None:
        preferences: dict = {}
        reranker: dict = {"relation": {}, "two": {}}
        weights = (cfg.gallery.relation_weight, cfg.gallery.binding_weight)
        for prompt in prompts:
            right = decoded[prompt.prompt]
            wrong = seen_by_clip(missed[prompt.prompt])
            texts = [prompt.prompt] * len(right)
            better = clip.score(right, texts) > clip.score(wrong, texts)
            preferences.setdefault(prompt.level, {}).setdefault(prompt.kind, []).extend(better.tolist())
            if prompt.kind in reranker:  # what reranking sorts by: CLIP's score plus the prompt's margin
                right_key, wrong_key = (
                    rerank_key(clip, images, prompt.prompt, *weights).key for images in (right, wrong)
                )
                reranker[prompt.kind].setdefault(prompt.level, []).extend((right_key > wrong_key).tolist())
        report["clip"] = getattr(clip, "identity", None)
        report["clip_on_training_relations"] = training_relations(storage, clip)
        report["clip_prefers_right"] = {
            level: {kind: round(float(np.mean(values)), 3) for kind, values in kinds.items()}
            for level, kinds in preferences.items()
        }
        for kind, name in (("relation", "relation"), ("two", "binding")):
            report[f"reranker_prefers_right_{name}"] = {
                level: round(float(np.mean(values)), 3) for level, values in reranker[kind].items()
            }
    if storage.exists(EVAL_REPORT):
        evaluation = storage.read_json(EVAL_REPORT)
        report["model_step"] = evaluation.get("step")
        report["model"] = scorecard_figures(evaluation)
        report["model_oracle_after"] = {
            level: {
                task: round(cell["oracle_after"], 3)
                for task, cell in figures["tasks"].items()
                if cell.get("oracle_after") is not None
            }
            for level, figures in evaluation.get("levels", {}).items()
        }
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
