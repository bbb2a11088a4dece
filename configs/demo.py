"""The offline demo (`./run.sh` with no arguments): the whole CLIP-Refine story on CPU in minutes, on a
synthetic world that the demo generates itself (`jax_refine/data/synthetic_world.py`; no borrowed data).

The world: 64x64 pictures of 1-3 identical objects (circle/square/triangle, 6 colours, small/large) in one
half of the picture on a patterned grey background, each with 5 captions from a small grammar with
paraphrases. Three disjoint splits from one seed: `pretrain`, `refine`, `test`.
1. pre-train a small CLIP from scratch, contrastively, on the `pretrain` split -- this gives a model with a
   modality gap, as real CLIPs have;
2. refine it on the `refine` split, with the same data, steps and learning rate for each: CLIP-Refine on
   L2-normalized features, CLIP-Refine on unnormalized features (the reference's form for OpenAI CLIPs),
   and contrastive fine-tuning as the baseline;
3. evaluate all four: zero-shot on the `test` pictures for each attribute (shape, colour, count, size,
   position, background; "a photo of a {}."), retrieval on the test pictures with their 5 captions each,
   modality gap, alignment, uniformity; write the table and pictures.
This is not the paper's setup (COCO + OpenAI CLIP + 12 zero-shot sets): it shows the mechanics.
"""
import ml_collections

from jax_refine import config_base


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    c = config_base.get_config(preset)
    c.workdir = "outputs/demo"
    c.model.name_or_path = ""  # the refinements start from the pre-trained model of stage 1
    c.model.random_init = {  # a small CLIP on the pictures resized to 32x32: ViT with 8x8 patches, 3 layers, width 128
        "projection_dim": 128,
        "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
                          "num_hidden_layers": 3, "num_attention_heads": 4},
        "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "max_position_embeddings": 24},
    }

    # The generated world (cached under world.cache_dir, keyed by generator version, seed and sizes).
    c.world = ml_collections.ConfigDict()
    c.world.seed = 0
    c.world.cache_dir = "outputs/world"
    c.world.image_size = 64  # rendered size; the model sees them resized to its 32x32
    c.world.pretrain = 4000  # pictures per split, 5 captions each
    c.world.refine = 1000
    c.world.test = 500
    c.world.retrieval_images = 200  # the first N test pictures form the retrieval set
    c.world.zero_shot_tasks = ("shape", "colour", "count", "size", "position", "background")

    c.data.source = "coco_json"
    c.data.split = "train"
    c.data.train_fraction = 1.0  # the world's splits are separate files already: train on all of each

    c.train.batch_size = 128
    c.train.export_hf = True
    c.checkpoint.every_steps = 50
    c.checkpoint.max_to_keep = 1
    c.log.every_steps = 10

    c.eval.batch_size = 250
    c.eval.templates = "single"  # "a photo of a {}." with the world's class prompts (e.g. "red shape")
    c.eval.plots = True  # zero_shot / retrieval sets are filled in by jax_refine/demo.py from the world

    # The stages, in order. Each trains on world split `split` from `start` ("random":
    # config.model.random_init; or the name of an earlier stage, whose HF export is also the frozen teacher)
    # and is evaluated under `name`. Anything not set here comes from the sections above.
    refine_defaults = dict(split="refine", start="pretrain", epochs=4, lr=3e-5, weight_decay=0.1,
                           schedule="constant", warmup_steps=0, normalize=True)

    def stage(**settings) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({**refine_defaults, **settings})

    c.demo = ml_collections.ConfigDict()
    c.demo.stages = ("pretrain", "clip_refine", "clip_refine_unnormalized", "contrastive")
    # CLIP's own pre-training loss (cosine similarities times a learned scale), from scratch.
    c.demo.pretrain = stage(name="pre-trained", method="contrastive", split="pretrain", start="random",
                            epochs=10, lr=1e-3, schedule="warmup_cosine", warmup_steps=20)
    # CLIP-Refine (HyCD + RaFA, the paper's alpha/T/lambda) on L2-normalized features.
    c.demo.clip_refine = stage(name="CLIP-Refine", method="clip_refine")
    # The same on unnormalized features, as the reference computes it for OpenAI's CLIPs.
    c.demo.clip_refine_unnormalized = stage(name="CLIP-Refine (unnormalized)", method="clip_refine",
                                            normalize=False)
    # The baseline: contrastive fine-tuning with the same data, steps and lr.
    c.demo.contrastive = stage(name="contrastive FT", method="contrastive")
    return c
