"""OpenCLIP / DFN checkpoints in open_clip's own format, read into our HF-layout `CLIP`.

`config.py`: open_clip model configs -> `transformers.CLIPConfig` (and what cannot be represented);
`params.py`: open_clip tensor names -> HF `CLIPModel` names, conversion and loading.
"""
