"""The offline demo (`./run.sh` with no arguments): the whole CLIP-Refine story on CPU in minutes.

1. pre-train a small CLIP from scratch, contrastively, on bundled CIFAR-10 photos with template captions
   (demo_data/captions_pretrain.json) -- this gives a model with a modality gap, as real CLIPs have;
2. refine it on a separate caption split (demo_data/captions_refine.json), with the same data, steps and
   learning rate for each: CLIP-Refine on L2-normalized features, CLIP-Refine on unnormalized features (the
   reference's form for OpenAI CLIPs), and contrastive fine-tuning as the baseline;
3. evaluate all four: zero-shot on the 1,000 held-out test photos, retrieval on 200 of them with 5 captions
   each, modality gap, alignment, uniformity; write the table and pictures.
This is not the paper's setup (COCO + OpenAI CLIP + 12 zero-shot sets); see demo_data/README.md.
"""
import ml_collections

from configs import default


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    c = default.get_config(preset)
    c.workdir = "outputs/demo"
    c.model.name_or_path = ""  # the refinements start from the pre-trained model of stage 1
    c.model.random_init = {  # a small CLIP for 32x32 photos: ViT with 8x8 patches, 3 layers, width 128
        "projection_dim": 128,
        "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
                          "num_hidden_layers": 3, "num_attention_heads": 4},
        "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "max_position_embeddings": 24},
    }

    c.data.source = "coco_json"
    c.data.split = "train"  # our COCO-json builder writes one split, "train"
    c.data.images = "demo_data/cifar10/train"
    c.data.annotations = "demo_data/captions_refine.json"
    c.data.shuffle_buffer = 4096

    c.train.batch_size = 128
    c.train.export_hf = True
    c.checkpoint.every_steps = 50
    c.checkpoint.max_to_keep = 1
    c.log.every_steps = 10

    c.eval.batch_size = 250
    c.eval.templates = "single"
    c.eval.zero_shot = ("folder:demo_data/cifar10/test",)
    c.eval.retrieval = ("coco_json:demo_data/captions_test.json:demo_data/cifar10/test",)
    c.eval.plots = True

    # The stages, in order. Each trains from `start` ("random": config.model.random_init; or the name of an
    # earlier stage, whose HF export is also the frozen teacher) and is evaluated under `name`.
    # Anything not set here comes from the sections above.
    refine_defaults = dict(annotations="demo_data/captions_refine.json", start="pretrain", epochs=4, lr=3e-5,
                           weight_decay=0.1, schedule="constant", warmup_steps=0, normalize=True)

    def stage(**settings) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({**refine_defaults, **settings})

    c.demo = ml_collections.ConfigDict()
    c.demo.stages = ("pretrain", "clip_refine", "clip_refine_unnormalized", "contrastive")
    # CLIP's own pre-training loss (cosine similarities times a learned scale), from scratch.
    c.demo.pretrain = stage(name="pre-trained", method="contrastive", start="random", epochs=12, lr=1e-3,
                            annotations="demo_data/captions_pretrain.json", schedule="warmup_cosine",
                            warmup_steps=20)
    # CLIP-Refine (HyCD + RaFA, the paper's alpha/T/lambda) on L2-normalized features.
    c.demo.clip_refine = stage(name="CLIP-Refine", method="clip_refine")
    # The same on unnormalized features, as the reference computes it for OpenAI's CLIPs.
    c.demo.clip_refine_unnormalized = stage(name="CLIP-Refine (unnormalized)", method="clip_refine",
                                            normalize=False)
    # The baseline: contrastive fine-tuning with the same data, steps and lr.
    c.demo.contrastive = stage(name="contrastive FT", method="contrastive")
    return c
