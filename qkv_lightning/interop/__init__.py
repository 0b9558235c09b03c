"""Weights in from the ecosystem and back out: Hugging Face GPT-2 and timm ViT checkpoints as our tasks' checkpoints.

``python cli.py import SRC DST`` (:mod:`qkv_lightning.interop.command`) turns

- a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``, the ``transformers`` layout) into a
  :class:`~qkv_lightning.tasks.language_model.LanguageModel` checkpoint (:mod:`qkv_lightning.interop.hf_gpt2`);
- timm ``vit_*`` weights (a ``.safetensors`` file or a weights-only ``.pth``) into an
  :class:`~qkv_lightning.tasks.image_classifier.ImageClassifier` checkpoint (:mod:`qkv_lightning.interop.timm_vit`).

Both become QKV models whose logits equal the source's; the written file has the layout of a ``fit`` checkpoint
(``state_dict`` and the ``hyper_parameters`` that rebuild the task), so ``validate``/``test --ckpt_path``, ``convert``
and ``fit --model.init_args.init_from`` take it. ``python cli.py export --format hf`` writes a QKV GPT back in the
GPT-2 layout, and the Llama-style trunk as a Llama or Qwen2 folder (:mod:`qkv_lightning.interop.hf_llama`). Nothing
here runs code from a file: configs are JSON, weights safetensors or weights-only torch files.
``safetensors`` (and, for the checks against the source library, ``transformers`` or ``timm``) are optional extras,
imported only by these commands.
"""
