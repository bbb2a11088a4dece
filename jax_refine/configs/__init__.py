"""The shipped configs, found by name: `--config NAME[:ARG]` imports `jax_refine.configs.NAME` and calls its
`get_config(ARG)`. A config of your own is a file that starts from one of these
(`from jax_refine.configs import default`) and is given by path: `--config my_config.py[:ARG]`.

- `default`: the base every config starts from (the paper's hyper-parameters; ARG: a mesh preset);
- `clip_refine`: the paper's experiments, `clip_refine:model=vitb32,method=clip_refine,data=coco,mesh=cpu`;
- `demo`, `study`: the offline demo and the real-data study (ARG: a mesh preset; study also `quick`);
- `tiny_test`: the trainer tests' tiny random CLIP; `presets`: the mesh presets (not a config).
"""
# Names of the per-experiment config files that `clip_refine` replaced; they still work as config names,
# and `OLD_NAME:PRESET` is `clip_refine:...,mesh=PRESET`.
ALIASES = {
    f"{method}_{model}_coco": f"clip_refine:method={method},model={model}"
    for method, model in (("clip_refine", "vitb32"), ("clip_refine", "vitb16"), ("clip_refine", "vitl14"),
                          ("contrastive", "vitb32"), ("self_kd", "vitb32"), ("feature_distill", "vitb32"),
                          ("logit_distill", "vitb32"), ("hycd", "vitb32"), ("rafa", "vitb32"), ("m2_mix", "vitb32"))
}
