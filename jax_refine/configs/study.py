"""The real-data study (`./run.sh study --data-dir ../shared/data`; `--quick` for a few-minute cut).

1. pre-train a small CLIP from scratch, contrastively, on Flickr8k train (6,000 photos x 5 human captions)
   plus CIFAR-10 train photos with template captions (so that CIFAR-10 zero-shot is measurably above
   chance: Flickr8k's captions name few of its classes); cached under out/pretrain/<key>;
2. choose the refinement lr ONCE on a validation slice (the last `val_photos` photos of Flickr8k dev,
   never refined on, never the test set): mean R@1 (both ways) of `select.methods`, seed 0;
3. refine with every method, `seeds` seeds each, the same data (the other Flickr8k dev photos, one random
   caption per photo per epoch), steps and lr, the paper's alpha 0.5 / T 1 / lambda 1, AdamW constant lr;
4. evaluate every model on Flickr8k test (1,000 x 5), coco_mini val (79 photos), CIFAR-10 test zero-shot
   (single prompt and the 80-template ensemble); one table of mean +- std over seeds and pictures.
"""
import ml_collections

from jax_refine.configs import default

METHODS = ("clip_refine", "contrastive", "self_kd", "hycd", "rafa", "feature_distill", "logit_distill", "m2_mix")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    quick = arg == "quick"
    c = default.get_config(None if quick else arg)
    c.workdir = "outputs/study"
    c.model.name_or_path = ""
    c.model.random_init = {  # ViT with 8x8 patches on 48x48 photos (36 tokens), 3 layers, width 128
        "projection_dim": 128,
        "vision_config": {"image_size": 48, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
                          "num_hidden_layers": 3, "num_attention_heads": 4},
        "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "max_position_embeddings": 24},
    }
    # method.normalize / weights / alpha: each method's preset (objectives.PRESETS; the reference's forms)
    c.data.source = "coco_json"  # the study writes each caption set as a COCO JSON under out/data
    c.data.split = "train"
    c.data.train_fraction = 1.0  # the study's caption sets are disjoint files already: train on all of each
    c.train.export_hf = True
    c.checkpoint.every_steps = 10_000  # one checkpoint at the end of each run
    c.checkpoint.max_to_keep = 1
    c.checkpoint.async_save = False
    c.log.every_steps = 20
    c.log.tensorboard = False
    c.eval.batch_size = 250
    c.eval.plots = True
    c.eval.progress = False

    c.study = ml_collections.ConfigDict()
    s = c.study
    s.flickr_photos = 0  # cut Flickr8k train/dev/test to their first N photos (0: all)
    s.cifar_per_class = 200  # CIFAR-10 train photos per class mixed into pre-training (0: none)
    s.cifar_test_examples = 1000  # CIFAR-10 test photos for zero-shot (a fixed subset, every class; 0: all)
    s.coco_images = 0  # coco_mini val photos for retrieval (0: all 79)
    # CLIP's own pre-training loss: InfoNCE on L2-normalized features times a learned scale
    s.pretrain = ml_collections.ConfigDict(dict(epochs=6, batch_size=128, lr=1e-3, weight_decay=0.1,
                                                schedule="warmup_cosine", warmup_steps=50, normalize=True))
    # normalize=True for every method: this CLIP learned its features through normalized similarities only,
    # so the norms of its unnormalized features are arbitrary (the reference's unnormalized form assumes
    # OpenAI CLIP's); the methods' weights and alpha are their presets
    s.refine = ml_collections.ConfigDict(dict(epochs=2, batch_size=64, weight_decay=0.1, normalize=True))
    s.resize_images = True  # decode + resize the photos once into out/data/<set>_<size>px (PNG, same pixels)
    s.val_photos = 200  # the last N Flickr8k dev photos: the lr-selection slice
    s.select = ml_collections.ConfigDict(dict(lrs=(3e-5, 1e-4, 3e-4), methods=("clip_refine", "contrastive")))
    s.methods = METHODS
    s.seeds = (0, 1, 2)
    s.picture_methods = ("clip_refine", "contrastive")  # drawn beside the pre-trained model (seed 0)
    s.compile_cache = True  # JAX persistent compilation cache under out/: seeds reuse each method's step

    if quick:  # a few minutes end to end: tiny model, tiny sets, 1 seed, 2 steps per method
        c.model.random_init = {
            "projection_dim": 32,
            "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2},
            "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 32},
        }
        s.flickr_photos = 48
        s.cifar_per_class = 4
        s.cifar_test_examples = 40
        s.coco_images = 16
        s.val_photos = 16
        s.pretrain.update(dict(epochs=1, batch_size=16, warmup_steps=1))
        s.refine.update(dict(epochs=1, batch_size=16))
        s.select.update(dict(lrs=(1e-4, 1e-3), methods=("clip_refine",)))
        s.methods = ("clip_refine", "contrastive")
        s.seeds = (0,)
        c.eval.batch_size = 64
    return c
