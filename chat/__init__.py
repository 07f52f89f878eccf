"""`xc-chat`: ask a (fine-tuned) IXC2.5 model about new images, videos and text.

The third program beside `pipeline/` and `trainer/`, and the only package that imports both: the
prompt is built by the pipeline's code (tokenizer, chat template, inference HD transform, video
strip), the answer by the trainer's model and generation loop (docs/ARCHITECTURE.md).
"""
