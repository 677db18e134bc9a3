"""The toy world: procedurally drawn scenes with captions, and a CLIP-format tokenizer trained on them.

A miniature text-to-image world in which concept ablation can be trained and measured offline on a CPU:
``ablate_jax.toy.world`` draws one object (a shape, or a face-bearing circle "instance") on a background
style, and ``ablate_jax.toy.tokenizer`` writes a byte-level BPE tokenizer that ``transformers.CLIPTokenizer``
loads.
"""
