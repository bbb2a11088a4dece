"""SigLIP (Zhai et al. 2023) in Flax NNX with the numerics of transformers' `SiglipModel`.

`modeling.SigLIP` (the module), `params.load_pretrained` / `save_pretrained` (HF checkpoints),
`tokenizer.get_tokenizer` / `tokenize` (SigLIP's SentencePiece tokenizer, max-length padding),
`image.preprocess_image` (SiglipImageProcessor: squash-resize, [-1, 1]).
"""
